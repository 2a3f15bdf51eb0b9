"""`ti2i build --backend aoti`: AOTInductor packages of the exported components.

Each component's torch module is loaded again from the model folder the manifest names, in the
graph's precision, traced with `torch.export` (the declared dims dynamic; where export cannot keep
them, e.g. a UNet whose skip connections constrain height and width, at the opt shapes) and
compiled with `torch._inductor.aoti_compile_and_package` for the device. Packages are cached
under a key of the weights, torch version, device, precision and profile, like TensorRT plans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ti2i.engines import builds, profiles
from ti2i.export.components import COMPONENTS, TORCH_DTYPES, ModelSource
from ti2i.manifest import ONNX, Manifest
from ti2i.spec import ComponentSpec, sample_inputs

BACKEND = "aoti"


def device_identity(device: str) -> str:
    if device == "cpu":
        return "cpu"
    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm {major}.{minor})"


def source_of(origin: str) -> ModelSource:
    """The manifest's source string back as a ModelSource ("MODEL + ADAPTER" for Video LDM)."""
    model, _, adapter = origin.partition(" + ")
    return ModelSource(model, adapter or None)


def build_packages(manifest: Manifest, names: list[str] | None = None, device: str = "cpu",
                   limits: Mapping[str, int] | None = None, dynamic: bool = True,
                   log: Callable[[str], None] = print) -> builds.BuildIndex:
    index = builds.BuildIndex.load(manifest.root, BACKEND)
    for name in names or [n for n, e in manifest.components.items() if e.backend == ONNX]:
        entry = manifest.components[name]
        precision = entry.precision or "fp32"
        prof = profiles.profile(entry.spec, limits)
        facts = builds.aoti_facts(entry.fingerprint or "", torch.__version__, device_identity(device), precision,
                                  prof, dynamic)
        key = builds.build_key(facts)
        if index.fresh(name, key) is not None:
            log(f"{name}: AOTInductor package up to date")
            continue
        component = COMPONENTS[name]
        module = component.load(source_of(entry.source or ""), component.subfolder, TORCH_DTYPES[precision])
        wrapper = component.wrap(module).eval().to(device)
        log(f"{name}: compiling with AOTInductor for {device} ({precision}) ...")
        program, kept_dynamic = _export(wrapper, entry.spec, prof, device, dynamic)
        file = builds.file_name(name, key, ".pt2")
        index.root.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(index.root / file))
        index.record(name, key, file, facts, dynamic=kept_dynamic, device=device, precision=precision)
        log(f"{name}: wrote {file} ({'dynamic' if kept_dynamic else 'static'} shapes)")
    return index


def _export(wrapper: torch.nn.Module, spec: ComponentSpec, prof: profiles.Profile, device: str,
            dynamic: bool) -> tuple[torch.export.ExportedProgram, bool]:
    """The exported program at the opt shapes, with the declared dims dynamic when export keeps them."""
    ranges = profiles.dim_ranges(spec, None)
    opt = {dim: r[1] for dim, r in ranges.items()}
    sample = sample_inputs(spec, opt)
    args = tuple(torch.from_numpy(sample[t.name]).to(device) for t in spec.inputs)
    if dynamic:
        # torch.export specialises sizes 0 and 1, so a range starting at 1 is declared from 2 (the
        # compiled package still runs size 1: checked by the tests at batch 1)
        dims = {dim: torch.export.Dim(dim.replace("-", "_"), min=max(low, 2), max=high)
                for dim, (low, _, high) in profiles.dim_ranges(spec, _limits_of(spec, prof)).items() if low < high}
        shapes = {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims}
                  for t in spec.inputs}
        try:
            with torch.inference_mode():
                return torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False), True
        except Exception:  # constraints export cannot keep (divisibility of height/width, ...): static below
            pass
    with torch.inference_mode():
        return torch.export.export(wrapper, args, strict=False), False


def _limits_of(spec: ComponentSpec, prof: profiles.Profile) -> dict[str, int]:
    """The profile's max size of each dim (the build limits, recovered from the profile)."""
    out: dict[str, int] = {}
    for tensor in spec.inputs:
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                out[dim] = prof[tensor.name][2][axis]
    return out
