"""Triton python-backend entry point of every ti2i method model: the work is in library code."""

from ti2i.triton_models.entry import MethodEntry
from ti2i.triton_models.stub import served

TritonPythonModel = served(MethodEntry)
