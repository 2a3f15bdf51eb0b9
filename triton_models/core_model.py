"""Triton python-backend entry point of a family's engine core: the work is in library code."""

import faulthandler

from ti2i.triton_models.core_server import TritonPythonModel  # noqa: F401

faulthandler.enable(all_threads=True)  # a stub that crashes leaves its threads' stacks in the server log
