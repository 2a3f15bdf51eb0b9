"""`ti2i export`: a diffusers model folder (hub id or local path) -> ONNX engines + manifest.

Steps: detect the model kind, gather the pipeline facts (scheduler config, VAE factors, tokenizer),
then for each declared component: load, wrap, export to ONNX with the spec's dynamic axes, and
validate the ONNX graph against the torch module at every declared sample size. A component whose
relative error exceeds its tolerance fails the export loudly.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ti2i.budget import format_bytes
from ti2i.engines.adapters import ADAPTER_MODULES, module_facts, takes_adapters
from ti2i.engines.calibrate import calibrate
from ti2i.engines.ort import OrtEngine
from ti2i.engines.processing import STEPS
from ti2i.errors import ComponentOutputError, ExportValidationError, InvalidInputError, ModelNotFoundError
from ti2i.export.components import (
    COMPONENTS,
    CONTROLLED_DECLARATIONS,
    KIND_BY_UNET_CHANNELS,
    KIND_COMPONENTS,
    SDXL_KIND_BY_UNET_CHANNELS,
    TORCH_DTYPES,
    Component,
    ModelSource,
    controlnet_component,
)
from ti2i.export.lora import fuse_loras, parse_lora
from ti2i.export.sources import check_exportable, check_reachable
from ti2i.manifest import MANIFEST_NAME, ONNX, PROCESSING, ComponentEntry, Manifest
from ti2i.spec import ComponentSpec, sample_inputs

ONNX_OPSET = 17
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's limit for one file


def detect_kind(model: str) -> str:
    """Which component set a model folder needs, from its UNet's class and input channels."""
    check_reachable(model)
    index = _load_config(model, None, "model_index.json")
    try:
        unet = _load_config(model, "unet", "config.json")
    except ModelNotFoundError:
        unet = None
    check_exportable(model, index, unet)
    if unet.get("_class_name") == "UNetSpatioTemporalConditionModel":
        return "svd"
    if unet.get("addition_embed_type") == "text_time" and not (index.get("text_encoder") or [None])[0]:
        return "sdxl_refiner"  # the second text encoder only (`check_exportable`)
    kinds = SDXL_KIND_BY_UNET_CHANNELS if unet.get("addition_embed_type") == "text_time" else KIND_BY_UNET_CHANNELS
    channels = unet.get("in_channels")
    if channels not in kinds:
        raise InvalidInputError(f"model {model!r}: a UNet with {channels} input channels is not supported "
                                f"(supported: {sorted(kinds)})")
    return kinds[channels]


# Facts every model sharing an engine directory must agree on (they share its encoders and VAE).
SHARED_FACTS = ("vae_scaling_factor", "vae_scale_factor", "latent_channels", "max_length", "tokenizer_sha256",
                "image_processor", "tokenizer_2", "tokenizer_2_sha256", "text_embeds_dim")
SDXL_KINDS = (*SDXL_KIND_BY_UNET_CHANNELS.values(), "sdxl_refiner")


def pipeline_facts(source: ModelSource, kind: str) -> tuple[dict[str, Any], list[Any]]:
    """Everything the sampling loops need besides the networks, and the model's tokenizers (SDXL: two)."""
    model = source.model
    components = KIND_COMPONENTS[kind]
    vae = _load_config(model, "vae", "config.json")
    unet = _load_config(model, "unet", "config.json")
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    denoiser = {"scheduler": _load_config(model, "scheduler", "scheduler_config.json"),
                "default_size": int(unet["sample_size"]) * vae_scale_factor,
                "in_channels": int(unet["in_channels"])}
    if kind == "svd":  # the reference pipeline's own defaults
        denoiser.update(num_frames=int(unet["num_frames"]), default_height=576, default_width=1024)
    facts: dict[str, Any] = {
        "vae_scaling_factor": float(vae.get("scaling_factor", 0.18215)),
        "vae_scale_factor": vae_scale_factor,
        "latent_channels": int(vae.get("latent_channels", 4)),
        # per denoiser: its model folder's scheduler (and for video: frame counts, default size)
        "unets": {COMPONENTS[name].served_name: dict(denoiser) for name in components if name.startswith("unet")},
    }
    if kind == "videoldm":
        adapter = _load_config(source.motion_adapter, None, "config.json")
        facts["unets"]["unet_motion"]["max_frames"] = int(adapter.get("motion_max_seq_length", 32))
    tokenizers = []
    if "text_encoder" in components or "text_encoder_xl" in components:
        from transformers import CLIPTokenizer

        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"))
        vocab = json.dumps(sorted(tokenizers[0].get_vocab().items())).encode()
        facts.update(tokenizer="tokenizer", max_length=int(tokenizers[0].model_max_length),
                     tokenizer_sha256=hashlib.sha256(vocab).hexdigest())
    if kind in SDXL_KINDS:  # the second tokenizer (it pads with "!"), the pooled text's width, the empty negative
        from transformers import CLIPTokenizer

        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
        vocab = json.dumps(sorted(tokenizers[-1].get_vocab().items())).encode()
        text_2 = _load_config(model, "text_encoder_2", "config.json")
        index = _load_config(model, None, "model_index.json")
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        facts.update(tokenizer_2="tokenizer_2", text_embeds_dim=int(text_2["projection_dim"]),
                     tokenizer_2_sha256=hashlib.sha256(vocab).hexdigest(),
                     max_length=int(tokenizers[-1].model_max_length))
        if kind == "sdxl_refiner":  # its own way with an empty negative prompt; aesthetic scores, not target sizes
            facts["unets"]["unet_refiner"].update(force_zeros_for_empty_prompt=zeros, aesthetic_scores=True,
                                                  text_width=int(unet["cross_attention_dim"]))
        else:
            facts["force_zeros_for_empty_prompt"] = zeros
        if index.get("is_cosxl_edit"):  # CosXL Edit: its image latents are scaled
            facts["unets"]["unet_pix2pix"]["scaled_image_latents"] = True
    if "image_encoder" in components:
        processor = _load_config(model, "feature_extractor", "preprocessor_config.json")
        facts["image_processor"] = {"image_mean": processor["image_mean"], "image_std": processor["image_std"]}
        facts["image_encoder_size"] = 224  # the reference resizes to 224² whatever the encoder's config says
    return facts, tokenizers


def _merge_facts(manifest: Manifest, facts: dict[str, Any], model: str, kind: str) -> None:
    if kind == "sdxl_refiner" and "tokenize_2" not in manifest.components:
        raise InvalidInputError(f"{model} is an SDXL refiner: it joins its base's engine directory, and "
                                f"{manifest.root} holds no SDXL base; export the base into it first")
    for key in SHARED_FACTS:
        if kind == "sdxl_refiner" and key == "tokenizer_sha256":  # it has the second tokenizer only
            continue
        if manifest.pipeline.get(key) != facts.get(key):
            raise InvalidInputError(
                f"{model} cannot join engine directory {manifest.root}: its {key} is {facts.get(key)!r}, the "
                f"directory's is {manifest.pipeline.get(key)!r}; export it into another directory")
    manifest.pipeline["unets"].update(facts["unets"])


def fingerprint(module: torch.nn.Module) -> str:
    """sha256 of the weights, to tell whether two model folders share a component."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_config(model: str, subfolder: str, filename: str) -> dict[str, Any]:
    from diffusers import ConfigMixin

    class _Cfg(ConfigMixin):
        config_name = filename

    try:
        return dict(_Cfg.load_config(model, subfolder=subfolder))
    except (OSError, EnvironmentError) as err:
        where = f"{subfolder}/{filename}" if subfolder else filename
        raise ModelNotFoundError(f"cannot read {where} of model {model!r}: {err}") from None


PRECISIONS = tuple(TORCH_DTYPES)


LORA_KINDS = ("sd", "pix2pix", "inpaint")  # the SD 1.x image models an SD 1.x adapter fits


def export_model(model: str, out_dir: str | Path, kind: str | None = None,
                 log: Callable[[str], None] = print, motion_adapter: str | None = None,
                 precision: str = "fp32", loras: Sequence[str] = (), controlnets: Sequence[str] = ()) -> Manifest:
    """Export `model` (with `motion_adapter`: its Video LDM temporal UNet too) into `out_dir`.

    With ``precision="fp16"`` every component whose declaration allows it is loaded in fp16 and
    exported so, then validated against the fp32 module within its fp16 tolerance. `loras` (``PATH[:SCALE]``)
    are fused into the UNet's and the text encoder's weights (`export/lora.py`). `controlnets` (diffusers
    ControlNet folders or hub ids) add each as ``controlnet_<name>`` and the UNet that takes their residuals.
    """
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    _quiet_libraries()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    detected = detect_kind(model)
    if motion_adapter is not None:
        check_reachable(motion_adapter, "config.json")
        if detected != "sd":
            raise InvalidInputError(f"a motion adapter needs an SD 1.x image model, but {model!r} is {detected!r}")
        detected = "videoldm"
    if kind is not None and kind != detected:
        known = ", ".join(KIND_COMPONENTS)
        raise InvalidInputError(f"--kind {kind!r} does not match model {model!r}, which is a {detected!r} model "
                                f"(kinds: {known}); leave --kind out to detect it")
    kind = detected
    adapters = tuple(parse_lora(text) for text in loras)
    named_controlnets = controlnet_names(controlnets)
    if named_controlnets and KIND_COMPONENTS[kind][-1] not in CONTROLLED_DECLARATIONS:
        raise InvalidInputError(f"--controlnet pairs with an SD 1.x or SDXL text-to-image or inpainting model, not a "
                                f"{kind!r} model")
    if adapters and kind not in LORA_KINDS:
        raise InvalidInputError(f"--lora fuses SD 1.x adapters into {', '.join(LORA_KINDS)} models, not a {kind!r} "
                                f"model")
    source = ModelSource(model, motion_adapter)
    facts, tokenizers = pipeline_facts(source, kind)
    if (out / MANIFEST_NAME).is_file():  # another model joins: it must share the text encoder and VAE
        manifest = Manifest.load(out)
        if manifest.precision != precision:
            raise InvalidInputError(f"{out} holds {manifest.precision} engines; export {precision} engines into "
                                    f"another directory")
        _merge_facts(manifest, facts, model, kind)
    elif kind == "sdxl_refiner":
        raise InvalidInputError(f"{model} is an SDXL refiner: it joins its base's engine directory (export the base "
                                f"into {out} first)")
    else:
        manifest = Manifest(out, precision, facts, tool_versions=_tool_versions())
        for tokenizer, folder in zip(tokenizers, ("tokenizer", "tokenizer_2")):
            tokenizer.save_pretrained(str(out / facts[folder]))
    manifest.sources[kind] = " + ".join([model, *([motion_adapter] if motion_adapter else []),
                                         *(f"lora {a}" for a in adapters)])

    if kind == "sdxl_refiner":  # before any export: its prompts are encoded with the base's graph
        _check_second_text_encoder(manifest, source)
    names = [*KIND_COMPONENTS[kind], *([CONTROLLED_DECLARATIONS[KIND_COMPONENTS[kind][-1]]] if named_controlnets
                                       else [])]
    if kind in SDXL_KINDS and precision == "fp16":
        names = _sdxl_vae(model, names, log)
    modules = _Modules(source, adapters, [(COMPONENTS[n], d) for n in names
                                          for d in {"fp32", COMPONENTS[n].precision(precision)}])
    for name in names:
        component = COMPONENTS[name]
        graph = component.precision(precision)
        if name == "text_encoder_xl":  # a refiner that joins must have the same second encoder
            manifest.pipeline["text_encoder_2_sha256"] = fingerprint(modules.peek(component, "fp32")[1])
        exported = modules.take(component, graph) if graph != "fp32" else None
        _export_component(manifest, component, modules.take(component, "fp32"), manifest.sources[kind], log,
                          exported)
    for name, folder in named_controlnets.items():
        component = controlnet_component(name, xl=kind in SDXL_KINDS)
        graph = component.precision(precision)
        exported = component.load(ModelSource(folder), None, TORCH_DTYPES[graph]) if graph != "fp32" else None
        _export_component(manifest, component, component.load(ModelSource(folder), None), folder, log, exported)
        served = manifest.pipeline.setdefault("controlnets", [])
        served[:] = sorted({*served, name})

    for step in STEPS.values():
        if step.applies(manifest.pipeline):
            manifest.components.setdefault(step.name, ComponentEntry(step.spec(manifest.pipeline), PROCESSING))
    manifest.write()
    return manifest


class _Modules:
    """The torch modules of an export, each loaded once (the VAE serves two components) and let go at its last
    use: an SDXL UNet's weights must not be held beside the next component's, nor beside its own engine."""

    def __init__(self, source: ModelSource, adapters: Sequence[Any], uses: Sequence[tuple[Component, str]]):
        self.source, self.adapters = source, adapters
        self.loaded: dict[tuple[Any, ...], torch.nn.Module] = {}
        self.uses = Counter(self._key(component, dtype) for component, dtype in uses)

    @staticmethod
    def _key(component: Component, dtype: str) -> tuple[Any, ...]:
        return component.subfolder, component.load, dtype

    def peek(self, component: Component, dtype: str) -> torch.nn.Module:
        key = self._key(component, dtype)
        if key not in self.loaded:
            self.loaded[key] = fuse_loras(component.load(self.source, component.subfolder, TORCH_DTYPES[dtype]),
                                          component.name, self.adapters)
        return self.loaded[key]

    def take(self, component: Component, dtype: str) -> torch.nn.Module:
        """The module for one use; the last use takes it out of the cache."""
        module = self.peek(component, dtype)
        key = self._key(component, dtype)
        self.uses[key] -= 1
        if self.uses[key] <= 0:
            del self.loaded[key]
        return module


def _sdxl_vae(model: str, names: list[str], log: Callable[[str], None]) -> list[str]:
    """SDXL's VAE overflows in fp16 (diffusers upcasts it: `force_upcast`): its declarations keep it fp32, unless
    the folder's VAE says it is safe in fp16 (the fp16-fix VAE: `force_upcast` false), which SD's declarations
    then export in fp16. Says which."""
    if _load_config(model, "vae", "config.json").get("force_upcast", True):
        log("vae: kept fp32 (SDXL's VAE overflows in fp16: its config says force_upcast)")
        return names
    log("vae: fp16 (its config says force_upcast false: an fp16-safe VAE)")
    return [{"vae_encoder_xl": "vae_encoder", "vae_decoder_xl": "vae_decoder"}.get(name, name) for name in names]


def _check_second_text_encoder(manifest: Manifest, source: ModelSource) -> None:
    """A refiner's text encoder must be its base's second (by weights): the base's graph encodes its prompts."""
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(source.model, subfolder="text_encoder_2")
    if fingerprint(encoder) != manifest.pipeline.get("text_encoder_2_sha256"):
        raise InvalidInputError(f"{source.model}: its second text encoder is not its base's (the one in "
                                f"{manifest.root}): a refiner joins the base it was made for")


def controlnet_names(folders: Sequence[str]) -> dict[str, str]:
    """Each ControlNet folder (or hub id) by the name it is served as: its last path part, lowercased, other
    characters than letters and digits as '_' (``lllyasviel/sd-controlnet-canny`` -> ``sd_controlnet_canny``)."""
    named: dict[str, str] = {}
    for folder in folders:
        check_reachable(folder, "config.json")
        name = re.sub(r"[^a-z0-9]+", "_", Path(folder.rstrip("/")).name.lower()).strip("_") or "controlnet"
        if name in named:
            raise InvalidInputError(f"--controlnet {folder} and {named[name]} would both be served as "
                                    f"controlnet_{name}: rename one folder")
        named[name] = folder
    return named


def _export_component(manifest: Manifest, component: Component, module: torch.nn.Module, origin: str,
                      log: Callable[[str], None], exported: torch.nn.Module | None = None) -> None:
    """Export and validate one component, or keep the engine already there if its weights are the same.

    `module` is the fp32 reference; `exported`, when given, the same weights in the graph's precision. Both are
    handed over (the caller keeps no reference): they are let go once traced, so the engine is validated and
    calibrated against outputs computed beforehand, without the weights held twice."""
    weights = fingerprint(module)
    name = component.served_name
    existing = manifest.components.get(name)
    if existing is not None:
        if existing.fingerprint != weights:
            raise InvalidInputError(f"{manifest.root} already holds a different {name} (from "
                                    f"{existing.source}); export {origin} into another directory")
        log(f"{name}: same weights as the engine already in {manifest.root}, kept")
        return
    precision = component.precision(manifest.precision)
    spec = component.declared_spec(module, manifest.pipeline, precision)
    adapter_facts = module_facts(module) if takes_adapters(spec) else None  # what adapters are loaded into
    wrapper = component.wrap(module).eval()
    expected = torch_references(wrapper, spec, component)
    graph = component.wrap(exported).eval() if exported is not None else wrapper
    del module, exported, wrapper
    file = f"{name}.onnx"
    export_onnx(graph, spec, component.sample_sizes[0], manifest.root / file)
    del graph
    gc.collect()
    tolerance = component.fp16_tolerance if precision == "fp16" else component.tolerance
    validation = validate(expected, spec, manifest.root / file, component, tolerance)
    log(f"{name}: exported {file} ({precision}), max relative error {validation['max_rel_error']:.2e} "
        f"against torch fp32 (tolerance {tolerance:.0e})")
    memory = calibrate(manifest.root / file, spec)
    tokens, growth = memory.points[-1]
    at = f" at {int(tokens)} tokens ({'×'.join(memory.token_dims)})" if memory.token_dims else ""
    log(f"{name}: {format_bytes(memory.base)} loaded, peak growth {format_bytes(growth)} per item{at}")
    manifest.components[name] = ComponentEntry(spec, ONNX, file, validation, origin, weights, memory, precision,
                                               component.name if component.served else None)
    if adapter_facts is not None:
        manifest.pipeline.setdefault(ADAPTER_MODULES, {})[name] = adapter_facts


def _quiet_libraries() -> None:
    """Tracer and loading chatter hides the validation lines users need to read."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()


def export_onnx(wrapper: torch.nn.Module, spec: ComponentSpec, sizes: Mapping[str, int], path: Path) -> None:
    """Trace at `sizes` with every symbolic dim dynamic; files over 2 GB keep their weights as external data."""
    sample = sample_inputs(spec, sizes)
    args = tuple(torch.from_numpy(sample[t.name]) for t in spec.inputs)
    dynamic_axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                    for t in (*spec.inputs, *spec.outputs)}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        with torch.inference_mode():
            torch.onnx.export(
                wrapper, args, str(raw),
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        fp32_inputs = {t.name for t in spec.inputs if t.dtype == "float32"}
        if any(t.dtype == "float16" for t in spec.outputs):
            _unify_fp16(raw, fp32_inputs)
        else:
            _two_level_group_norms(raw)
        _finalise_onnx(Path(tmp), raw, path)


def _two_level_group_norms(raw: Path) -> None:
    """`norms.two_level_group_norms` on the traced graph (its external weights stay where they are)."""
    import onnx

    from ti2i.export.norms import two_level_group_norms

    graph = onnx.load(str(raw), load_external_data=False)
    if two_level_group_norms(graph, raw.parent):
        onnx.save_model(graph, str(raw))


def _unify_fp16(raw: Path, fp32_inputs: set[str]) -> None:
    import onnx

    from ti2i.export.fp16 import unify_fp16

    model = unify_fp16(onnx.load(str(raw)), fp32_inputs)  # with any external weights
    for traced in list(raw.parent.iterdir()):
        traced.unlink()
    weights = sum(len(t.raw_data) for t in model.graph.initializer)  # protobuf refuses a message over 2 GB
    onnx.save_model(model, str(raw), save_as_external_data=weights >= EXTERNAL_DATA_THRESHOLD,
                    all_tensors_to_one_file=True, location=raw.name + ".data")


def _finalise_onnx(tmp: Path, raw: Path, path: Path) -> None:
    """Move the traced graph to `path`; over the threshold, with its weights in one `.data` file beside it,
    written a tensor at a time (an SDXL UNet's 9.6 GiB are never held twice)."""
    import onnx
    from onnx.external_data_helper import (
        load_external_data_for_tensor,
        save_external_data,
        set_external_data,
        uses_external_data,
    )

    total = sum(f.stat().st_size for f in tmp.iterdir())
    data = path.with_name(path.name + ".data")
    for old in (path, data):
        old.unlink(missing_ok=True)
    if total < EXTERNAL_DATA_THRESHOLD:
        shutil.move(str(raw), path)
        return
    graph = onnx.load(str(raw), load_external_data=False)
    data.touch()
    for tensor in graph.graph.initializer:
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, str(tmp))
        elif len(tensor.raw_data) < 1024:
            continue
        set_external_data(tensor, data.name)
        save_external_data(tensor, str(path.parent))
        tensor.ClearField("raw_data")
    onnx.save_model(graph, str(path))


@dataclasses.dataclass(frozen=True)
class Reference:
    """The torch fp32 outputs for one declared sample size: what the engine must reproduce."""

    sizes: Mapping[str, int]
    inputs: dict[str, np.ndarray]
    outputs: tuple[np.ndarray, ...]


def torch_references(wrapper: torch.nn.Module, spec: ComponentSpec, component: Component) -> list[Reference]:
    """The fp32 module's outputs at every declared sample size, computed before export so that the module's
    weights need not stay loaded beside the engine that is validated against them."""
    spec = spec.interface()
    references = []
    for i, sizes in enumerate(component.sample_sizes):
        sample = sample_inputs(spec, sizes, seed=100 + i)
        with torch.inference_mode():
            out = wrapper(*(torch.from_numpy(sample[t.name]) for t in spec.inputs))
        outputs = out if isinstance(out, tuple) else (out,)
        references.append(Reference(dict(sizes), sample, tuple(o.numpy() for o in outputs)))
    return references


def validate(expected: Sequence[Reference], spec: ComponentSpec, path: Path, component: Component,
             tolerance: float | None = None) -> dict[str, Any]:
    """Relative error (max |onnx − torch| / max |torch|) of each output at every declared sample size.

    `expected` holds the fp32 module's outputs whatever the graph's precision: an fp16 graph is measured
    against fp32."""
    tolerance = component.tolerance if tolerance is None else tolerance
    engine = OrtEngine(path, spec)
    try:
        per_size = [_validation_errors(reference, spec.interface(), engine) for reference in expected]
    finally:
        engine.close()
    worst = max(max(entry["rel_error"].values()) for entry in per_size)
    if not worst <= tolerance:
        raise ExportValidationError(f"{spec.name}: ONNX output differs from torch by relative error {worst:.3e} "
                                    f"> tolerance {tolerance:.0e} ({per_size})")
    precision = "fp16" if any(t.dtype == "float16" for t in (*spec.inputs, *spec.outputs)) else "fp32"
    return {"max_rel_error": worst, "tolerance": tolerance, "per_size": per_size, "precision": precision,
            "reference": "torch fp32"}


def _validation_errors(reference: Reference, spec: ComponentSpec, engine: OrtEngine) -> dict[str, Any]:
    try:
        got = engine.run(reference.inputs)
    except ComponentOutputError as err:  # NaN is never "within tolerance"
        raise ExportValidationError(f"{err} at sizes {reference.sizes}") from None
    errors = {}
    for tensor, expected in zip(spec.outputs, reference.outputs):
        actual = got[tensor.name]
        if actual.shape != expected.shape:
            raise ExportValidationError(f"{spec.name}.{tensor.name}: ONNX shape {actual.shape} "
                                        f"!= torch shape {expected.shape} at sizes {reference.sizes}")
        scale = max(float(np.abs(expected).max()), 1e-12)
        error = float(np.abs(actual - expected).max()) / scale
        errors[tensor.name] = error if math.isfinite(error) else math.inf  # NaN must never pass
    return {"sizes": reference.sizes, "rel_error": errors}


def _tool_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import transformers

    import ti2i

    return {"ti2i": ti2i.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "opset": str(ONNX_OPSET)}


def describe(manifest: Manifest) -> str:
    return json.dumps({n: e.validation for n, e in manifest.components.items() if e.validation}, indent=2)
