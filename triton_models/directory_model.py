"""Triton python-backend entry point of a multi-family server's `families` model."""

from ti2i.triton_models.directory import DirectoryModel as TritonPythonModel  # noqa: F401
