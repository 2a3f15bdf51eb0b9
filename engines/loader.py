"""Build engines from an engine directory's manifest, whatever backend each entry names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from ti2i.budget import io_memory, machine_budget
from ti2i.engines.base import Engine
from ti2i.engines.openvino import PRECISIONS
from ti2i.engines.processing import STEPS, ProcessingEngine
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import ONNX, PROCESSING, Manifest


ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
BACKENDS = (ONNXRUNTIME, OPENVINO, "tensorrt", "aoti")
# What users call them (`--backend`) -> the loader's names.
ENGINE_BACKENDS = {"ort": ONNXRUNTIME, "openvino": OPENVINO, "aoti": "aoti", "tensorrt": "tensorrt"}


def check_choice(backend: str, precision: str) -> None:
    """A known `--backend`, and a `--precision` it takes (bf16 is OpenVINO's alone), without asking the CPU."""
    if backend not in ENGINE_BACKENDS:
        raise InvalidInputError(f"unknown engine backend {backend!r} (known: {', '.join(ENGINE_BACKENDS)})")
    if precision not in PRECISIONS or (precision == "bf16" and ENGINE_BACKENDS[backend] != OPENVINO):
        raise InvalidInputError(f"precision {precision!r}: auto, fp32, or bf16 with the openvino backend (only the "
                                f"openvino backend runs bf16 (--backend openvino); {backend} runs its engines' own "
                                f"precision)")


def engine_choice(backend: str, precision: str = "auto") -> dict[str, str]:
    """A user's `--backend` and `--precision` as the loader's options. Precision is OpenVINO's to choose (its
    `auto` follows the CPU); the other backends run their graphs' or builds' own precision."""
    check_choice(backend, precision)
    if ENGINE_BACKENDS[backend] != OPENVINO:
        return {"backend": ENGINE_BACKENDS[backend], "precision": "fp32"}
    from ti2i.engines.openvino import resolve_precision

    return {"backend": OPENVINO, "precision": resolve_precision(precision)}


def describe_choice(choice: dict[str, str], device: str = "cpu") -> str:
    """What `engine_choice` chose, for the start of a run (OpenVINO: its precision and the CPU's bf16 units)."""
    if choice["backend"] == OPENVINO:
        from ti2i.engines.openvino import describe_precision

        return describe_precision(choice["precision"])
    return f"{choice['backend']} engines on {device}"


def load_engine(manifest: Manifest, name: str, providers: Sequence[str] | None = None,
                threads: int | None = None, budget: int | Mapping[str, int] | None = None, backend: str = ONNXRUNTIME,
                device: str = "cpu", precision: str = "fp32") -> Engine:
    """The engine of `name`: ONNX Runtime, OpenVINO on the same graph (in `precision`, fp32 or bf16, where the
    component's declaration allows bf16), or the TensorRT plan / AOTInductor package `ti2i build` wrote
    (components without a build of that backend run on ONNX Runtime). ONNX Runtime engines refuse requests
    over `budget` bytes (default: this machine's budget as it was before the engine loaded, since the estimates
    count the engine's own weights; a mapping gives it by component); a manifest written before memory
    calibration gets its engines calibrated here, at load (seconds).
    """
    if name not in manifest.components:
        raise ModelNotFoundError(f"{manifest.root} has no component {name!r} (has {sorted(manifest.components)})")
    entry = manifest.components[name]
    if isinstance(budget, Mapping):
        budget = budget.get(name)
    if entry.backend == ONNX and backend not in (ONNXRUNTIME, OPENVINO):
        compiled = _load_compiled(manifest, name, backend, device)
        if compiled is not None:
            return compiled
    if budget is None:  # what was available before this engine took its share: its base is in the estimates
        budget = machine_budget()
    if entry.backend == ONNX:
        from ti2i.engines.calibrate import calibrate
        if backend == OPENVINO:
            engine = _openvino_engine(manifest, name, threads, precision)
        else:
            from ti2i.engines.ort import OrtEngine

            engine = OrtEngine(manifest.path_of(name), entry.spec, providers=providers, threads=threads)
        engine.memory = entry.memory or calibrate(manifest.path_of(name), entry.spec)
        engine.budget = budget
        return engine
    if entry.backend == PROCESSING:
        from ti2i.engines.calibrate import layout

        engine = ProcessingEngine(STEPS[name], entry.spec, manifest.pipeline, manifest.root)
        dims = layout(entry.spec)
        engine.memory = io_memory(entry.spec, dims["token_dims"], dims["item_dims"])
        engine.budget = budget
        return engine
    raise ModelNotFoundError(f"component {name!r}: unknown backend {entry.backend!r}")


def load_engines(manifest: Manifest, names: Iterable[str] | None = None, **kwargs) -> dict[str, Engine]:
    return {name: load_engine(manifest, name, **kwargs) for name in (names or manifest.components)}


def _openvino_engine(manifest: Manifest, name: str, threads: int | None, precision: str) -> Engine:
    from ti2i.engines.openvino import OpenVinoEngine, cache_dir
    from ti2i.export.components import COMPONENTS

    declared = COMPONENTS.get(manifest.components[name].declared_as)
    if precision == "bf16" and declared is not None and not declared.bf16:
        precision = "fp32"
    return OpenVinoEngine(manifest.path_of(name), manifest.components[name].spec, precision, threads=threads,
                          cache=cache_dir(manifest.root, precision))


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
