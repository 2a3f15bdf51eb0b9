"""Triton python-backend entry point of a multi-family server's `families` model."""

from ti2i.triton_models.directory import DirectoryModel
from ti2i.triton_models.stub import served

TritonPythonModel = served(DirectoryModel)
