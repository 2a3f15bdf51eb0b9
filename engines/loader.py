"""Build engines from an engine directory's manifest, whatever backend each entry names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ti2i.budget import io_memory, machine_budget
from ti2i.engines.base import Engine
from ti2i.engines.processing import STEPS, ProcessingEngine
from ti2i.errors import ModelNotFoundError
from ti2i.manifest import ONNX, PROCESSING, Manifest


ONNXRUNTIME = "onnxruntime"
BACKENDS = (ONNXRUNTIME, "tensorrt", "aoti")


def load_engine(manifest: Manifest, name: str, providers: Sequence[str] | None = None,
                threads: int | None = None, budget: int | Mapping[str, int] | None = None, backend: str = ONNXRUNTIME,
                device: str = "cpu") -> Engine:
    """The engine of `name`: ONNX Runtime, or the TensorRT plan / AOTInductor package `ti2i build` wrote
    (components without a build of that backend run on ONNX Runtime). ONNX Runtime engines refuse requests
    over `budget` bytes (default: this machine's budget; a mapping gives it by component); a manifest written before memory calibration gets
    its engines calibrated here, at load (seconds).
    """
    if name not in manifest.components:
        raise ModelNotFoundError(f"{manifest.root} has no component {name!r} (has {sorted(manifest.components)})")
    entry = manifest.components[name]
    if isinstance(budget, Mapping):
        budget = budget.get(name)
    if entry.backend == ONNX and backend != ONNXRUNTIME:
        compiled = _load_compiled(manifest, name, backend, device)
        if compiled is not None:
            return compiled
    if entry.backend == ONNX:
        from ti2i.engines.calibrate import calibrate
        from ti2i.engines.ort import OrtEngine

        engine = OrtEngine(manifest.path_of(name), entry.spec, providers=providers, threads=threads)
        engine.memory = entry.memory or calibrate(manifest.path_of(name), entry.spec)
        engine.budget = machine_budget() if budget is None else budget
        return engine
    if entry.backend == PROCESSING:
        from ti2i.engines.calibrate import layout

        engine = ProcessingEngine(STEPS[name], entry.spec, manifest.pipeline, manifest.root)
        dims = layout(entry.spec)
        engine.memory = io_memory(entry.spec, dims["token_dims"], dims["item_dims"])
        engine.budget = machine_budget() if budget is None else budget
        return engine
    raise ModelNotFoundError(f"component {name!r}: unknown backend {entry.backend!r}")


def load_engines(manifest: Manifest, names: Iterable[str] | None = None, **kwargs) -> dict[str, Engine]:
    return {name: load_engine(manifest, name, **kwargs) for name in (names or manifest.components)}


def _load_compiled(manifest: Manifest, name: str, backend: str, device: str) -> Engine | None:
    from ti2i.engines.builds import BuildIndex

    if backend not in BACKENDS:
        raise ModelNotFoundError(f"unknown engine backend {backend!r} (known: {', '.join(BACKENDS)})")
    index = BuildIndex.load(manifest.root, backend)
    if name not in index.entries:
        return None
    spec = manifest.components[name].spec
    if backend == "tensorrt":
        from ti2i.engines.tensorrt import TrtEngine

        return TrtEngine(index.path(name), spec, index.profile(name))
    from ti2i.engines.aoti import AotiEngine

    entry = index.entries[name]
    return AotiEngine(index.path(name), spec, index.profile(name), bool(entry.get("dynamic")),
                      device=entry.get("device", device), multiple=entry.get("multiple"))
