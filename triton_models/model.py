"""Triton python-backend entry point for every ti2i component model: the work is in library code."""

import faulthandler

from ti2i.triton_models.python_model import TritonPythonModel  # noqa: F401

faulthandler.enable(all_threads=True)  # a stub that crashes leaves its threads' stacks in the server log
