"""Triton python-backend entry point for every ti2i component model: the work is in library code."""

from ti2i.triton_models.python_model import TritonPythonModel as Model
from ti2i.triton_models.stub import served

TritonPythonModel = served(Model)
