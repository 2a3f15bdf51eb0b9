"""Triton python-backend entry point for every ti2i method model: the work is in library code."""

from ti2i.triton_models.method_server import TritonPythonModel  # noqa: F401
