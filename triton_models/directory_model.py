"""Triton python-backend entry point of a multi-family server's `families` model."""

import faulthandler

from ti2i.triton_models.directory import DirectoryModel as TritonPythonModel  # noqa: F401

faulthandler.enable(all_threads=True)  # a stub that crashes leaves its threads' stacks in the server log
