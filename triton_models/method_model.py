"""Triton python-backend entry point of every ti2i method model: the work is in library code."""

import faulthandler

from ti2i.triton_models.entry import MethodEntry as TritonPythonModel  # noqa: F401

faulthandler.enable(all_threads=True)  # a stub that crashes leaves its threads' stacks in the server log
