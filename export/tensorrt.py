"""`ti2i build --backend tensorrt`: TensorRT plans from the exported ONNX graphs.

As NVIDIA's demo builds them: the ONNX parser, a strongly typed network (precision comes from the
graph: an fp16 export gives an fp16 plan), one optimization profile per input with min/opt/max
derived from the declaration, builder optimisation level 3, and a timing cache kept beside the
plans so later builds (other components, other profiles) reuse the kernel timings. Plans are
cached under a key of the ONNX file, the TensorRT version, the GPU and the profile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ti2i.engines import builds, profiles
from ti2i.engines.tensorrt import gpu_identity, require_tensorrt
from ti2i.errors import ExportValidationError
from ti2i.manifest import ONNX, Manifest

BACKEND = "tensorrt"
OPTIMIZATION_LEVEL = 3
TIMING_CACHE = "timing.cache"
# A plan's execution context holds activation memory for its profile's maximum: the declared ranges (images
# up to 2048², 16 at a time) would ask for far more than a GPU has. Plans default to NVIDIA demo-like
# ranges (1024² images, batch 8 = 4 requests × a CFG pair, 25 frames: SVD-XT); `--limit` overrides.
DEFAULT_LIMITS = {"batch": 8, "image_height": 1024, "image_width": 1024, "height": 128, "width": 128,
                  "frames": 25}


def build_plans(manifest: Manifest, names: list[str] | None = None, limits: Mapping[str, int] | None = None,
                log: Callable[[str], None] = print) -> builds.BuildIndex:
    trt = require_tensorrt()
    gpu, capability = gpu_identity()
    index = builds.BuildIndex.load(manifest.root, BACKEND)
    index.root.mkdir(parents=True, exist_ok=True)
    for name in names or [n for n, e in manifest.components.items() if e.backend == ONNX]:
        entry = manifest.components[name]
        onnx_path = manifest.path_of(name)
        prof = profiles.profile(entry.spec, _limits_for(entry.spec, limits))
        facts = builds.plan_facts(builds.file_fingerprint(onnx_path), trt.__version__, gpu, capability, prof)
        key = builds.build_key(facts)
        if index.fresh(name, key) is not None:
            log(f"{name}: plan up to date")
            continue
        file = builds.file_name(name, key, ".plan")
        log(f"{name}: building a TensorRT plan for {gpu} (profile {profiles.canonical(prof)}) ...")
        _build(trt, onnx_path, prof, index.root / file, index.root / TIMING_CACHE)
        index.record(name, key, file, facts, precision=entry.precision or "fp32")
        log(f"{name}: wrote {file}")
    return index


def _limits_for(spec, limits: Mapping[str, int] | None) -> dict[str, int]:
    """The build's caps: the defaults, then the user's, each only where the spec's range allows it."""
    wanted = {**DEFAULT_LIMITS, **(limits or {})}
    return {dim: max(size, spec.dims[dim][0]) for dim, size in wanted.items() if dim in spec.dims}


def _build(trt, onnx_path: Path, prof: profiles.Profile, out: Path, cache_path: Path) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportValidationError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = OPTIMIZATION_LEVEL
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in prof.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportValidationError(f"TensorRT failed to build a plan from {onnx_path}")
    tmp = out.with_suffix(".partial")
    tmp.write_bytes(bytes(plan))
    tmp.replace(out)  # a half-written plan is never left under a valid name
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
