"""Triton python-backend entry point of every component model served through an engine core."""

from ti2i.triton_models.entry import ComponentEntry as TritonPythonModel  # noqa: F401
