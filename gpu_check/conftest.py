"""GPU checks: every test here is marked `gpu` and skipped, with the reason, where torch sees no CUDA device."""

from __future__ import annotations

import importlib.util

import pytest

from gpu_check import _path  # noqa: F401  (ti2i importable from the checkout)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run by `make gpu-check`)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"no CUDA GPU visible to torch {torch.__version__}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
