"""Triton python-backend entry point of a family's engine core: the work is in library code."""

from ti2i.triton_models.core_server import TritonPythonModel  # noqa: F401
