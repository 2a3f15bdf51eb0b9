"""Triton python-backend entry point of every ti2i method model: the work is in library code."""

from ti2i.triton_models.entry import MethodEntry as TritonPythonModel  # noqa: F401
