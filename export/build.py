"""`ti2i build`: compile an engine directory for a backend (TensorRT plans, AOTInductor packages)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ti2i.engines.builds import BuildIndex
from ti2i.engines.profiles import parse_limits
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import ONNX, Manifest


def build(engine_dir: str | Path, backend: str, components: str | None = None, limits: str | None = None,
          device: str | None = None, log: Callable[[str], None] = print) -> BuildIndex:
    manifest = Manifest.load(engine_dir)
    onnx_names = [n for n, e in manifest.components.items() if e.backend == ONNX]
    names = [c.strip() for c in components.split(",")] if components else onnx_names
    unknown = [n for n in names if n not in onnx_names]
    if unknown:
        raise ModelNotFoundError(f"{manifest.root} has no ONNX component {unknown} (has {onnx_names})")
    caps = parse_limits(limits)
    if backend == "tensorrt":
        from ti2i.export.tensorrt import build_plans

        return build_plans(manifest, names, caps, log)
    if backend == "aoti":
        import torch

        from ti2i.export.aoti import build_packages

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return build_packages(manifest, names, device, caps, log=log)
    raise InvalidInputError(f"unknown backend {backend!r} (tensorrt or aoti)")
