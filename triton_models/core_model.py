"""Triton python-backend entry point of a family's engine core: the work is in library code."""

from ti2i.triton_models.core_server import TritonPythonModel as Model
from ti2i.triton_models.stub import served

TritonPythonModel = served(Model)
