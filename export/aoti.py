"""`ti2i build --backend aoti`: AOTInductor packages of the exported components.

Each component's torch module is loaded again from the model folder the manifest names, in the
graph's precision, traced with `torch.export` with the declared dims dynamic and compiled with
`torch._inductor.aoti_compile_and_package` for the device. Where export cannot keep a dim fully
dynamic (a UNet's skip connections constrain height and width), the latent height and width are
kept in multiples of 8 (64 px: 512², 576×1024, ...); what cannot be kept at all is compiled at the
opt shapes. Packages are cached under a key of the weights, torch version, device, precision and
profile, like TensorRT plans.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ti2i.engines import builds, profiles
from ti2i.engines.aoti import LATENT_DIMS
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
        component = COMPONENTS[entry.declared_as]
        module = component.load(source_of(entry.source or ""), component.subfolder, TORCH_DTYPES[precision])
        wrapper = component.wrap(module).eval().to(device)
        log(f"{name}: compiling with AOTInductor for {device} ({precision}) ...")
        program, multiple = _export(wrapper, entry.spec, prof, device, dynamic)
        file = builds.file_name(name, key, ".pt2")
        index.root.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(index.root / file))
        index.record(name, key, file, facts, dynamic=multiple is not None, multiple=multiple, device=device,
                     precision=precision)
        shapes = {None: "static shapes", 1: "dynamic shapes"}.get(multiple, f"latent sizes in multiples of {multiple}")
        log(f"{name}: wrote {file} ({shapes})")
    return index


LATENT_MULTIPLE = 8  # latent sizes a UNet package accepts when fully dynamic ones cannot be kept (64 px)


def _export(wrapper: torch.nn.Module, spec: ComponentSpec, prof: profiles.Profile, device: str,
            dynamic: bool) -> tuple[torch.export.ExportedProgram, int | None]:
    """The exported program and the latent multiple it keeps dynamic (1: every declared size, 8: latent
    height/width in multiples of 8, as a UNet's skip connections need under torch.export; None: static at
    the opt shapes)."""
    ranges = profiles.dim_ranges(spec, _limits_of(spec, prof))
    opt = {dim: r[1] for dim, r in ranges.items()}
    attempts = (1, LATENT_MULTIPLE) if dynamic else ()
    for multiple in attempts:
        sizes = dict(opt)
        dims: dict[str, Any] = {}
        for dim, (low, _, high) in ranges.items():
            if low == high:
                continue
            if multiple > 1 and dim in LATENT_DIMS:
                # torch.export specialises sizes 0 and 1: the traced size is at least twice the multiple
                sizes[dim] = max(2 * multiple, opt[dim] - opt[dim] % multiple)
                dims[dim] = multiple * torch.export.Dim(f"{dim}_{multiple}", min=max(1, -(-low // multiple)),
                                                         max=high // multiple)
            else:  # a range starting at 1 is declared (and traced) from 2; the package still runs size 1 (tested)
                sizes[dim] = max(sizes[dim], 2)
                dims[dim] = torch.export.Dim(dim, min=max(low, 2), max=high)
        shapes = {t.name: {i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str) and d in dims}
                  for t in spec.inputs}
        args = _args(spec, sizes, device)
        try:
            with torch.inference_mode():
                return torch.export.export(wrapper, args, dynamic_shapes=shapes, strict=False), multiple
        except Exception:  # constraints export cannot keep: the next attempt
            continue
    with torch.inference_mode():
        return torch.export.export(wrapper, _args(spec, opt, device), strict=False), None


def _args(spec: ComponentSpec, sizes: Mapping[str, int], device: str) -> tuple[torch.Tensor, ...]:
    sample = sample_inputs(spec, sizes)
    return tuple(torch.from_numpy(sample[t.name]).to(device) for t in spec.inputs)


def _limits_of(spec: ComponentSpec, prof: profiles.Profile) -> dict[str, int]:
    """The profile's max size of each dim (the build limits, recovered from the profile)."""
    out: dict[str, int] = {}
    for tensor in spec.inputs:
        for axis, dim in enumerate(tensor.shape):
            if isinstance(dim, str):
                out[dim] = prof[tensor.name][2][axis]
    return out
