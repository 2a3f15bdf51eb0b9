"""Triton python-backend entry point of every component model served through an engine core."""

from ti2i.triton_models.entry import ComponentEntry
from ti2i.triton_models.stub import served

TritonPythonModel = served(ComponentEntry)
