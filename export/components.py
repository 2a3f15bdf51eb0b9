"""Component declarations: each exported network declared once.

A declaration says how to load the torch module from a diffusers folder (hub id or local path),
how to wrap it so its positional forward matches the spec, its spec (names, dtypes, symbolic dims
with ranges, resolved from the module's config) and the sizes used to trace and validate it.
Export, engines, the Triton generator and the clients all read what this module declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from ti2i.client.registry import CONTROLNET_PREFIX
from ti2i.engines.adapters import LORA_DOWN, LORA_RANK, LORA_UP, MAX_RANK
from ti2i.engines.adapters import totals as lora_totals
from ti2i.engines.processing import MAX_BATCH, image_dims
from ti2i.errors import InvalidInputError
from ti2i.export.lora import attach_lora_slots
from ti2i.spec import BATCH, ComponentSpec, TensorSpec, derived_sizes

UNET_MAX_BATCH = 32  # up to 4 guidance branches × 8 requests batched by the server
# Limit on the magnitude of latents, images and embeddings a network accepts: far beyond anything the pipelines
# send (unit-scale model inputs; latents ÷ the VAE scaling factor stay within ±10²), far below what overflows
# float32 inside a network (3e38 in a VAE latent came back as NaN images).
VALUE_LIMIT = 1e4
VALUES = (-VALUE_LIMIT, VALUE_LIMIT)


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a diffusers folder or hub id, and for Video LDM its motion adapter."""

    model: str
    motion_adapter: str | None = None


@dataclass(frozen=True)
class Component:
    name: str  # the declaration's own name (COMPONENTS' key)
    subfolder: str | None  # in the model folder (None: the folder is the component's own, a ControlNet's)
    load: Callable[..., torch.nn.Module]  # (source, subfolder, dtype=torch.float32) -> module
    wrap: Callable[[torch.nn.Module], torch.nn.Module]
    spec: Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]
    # Symbolic sizes to trace with (the first) and to validate at (all): one of them is deliberately
    # not a multiple of the UNet's downsampling factor, so odd sizes stay exact in the exported graph.
    sample_sizes: tuple[Mapping[str, int], ...]
    tolerance: float = 1e-4
    # The batch it usually runs at (the CFG pair for a denoiser): the size compiled engines tune for.
    opt_batch: int = 1
    # fp16 export: whether the graph may be fp16 at all, and its tolerance against the fp32 torch module.
    fp16: bool = True
    fp16_tolerance: float = 2e-2
    # Inputs that stay float32 in an fp16 graph (as NVIDIA's demo keeps the timestep).
    fp32_inputs: frozenset[str] = frozenset({"timestep"})
    # OpenVINO bf16 (`--precision bf16|auto`): whether the CPU may run this component in bf16 (else fp32).
    bf16: bool = True
    # The name it is served and called by, when that is another declaration's too (SDXL's UNet is the "unet"
    # its family's methods call, with SDXL's own inputs); None: its own name.
    served: str | None = None

    @property
    def served_name(self) -> str:
        return self.served or self.name

    def precision(self, requested: str) -> str:
        """The precision this component is exported in when `requested` is asked for."""
        return requested if self.fp16 else "fp32"

    def declared_spec(self, module: torch.nn.Module, pipeline: Mapping[str, Any], precision: str = "fp32"
                      ) -> ComponentSpec:
        """The spec with its opt sizes and, for fp16, its float tensors' dtype: one place for both."""
        spec = self.spec(module, pipeline)
        spec = replace(spec, opt=_opt_sizes(spec, pipeline, self.opt_batch))
        if self.precision(precision) == "fp16":
            spec = spec.with_float_dtype("float16", keep=self.fp32_inputs)
        return spec


TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _default_size(pipeline: Mapping[str, Any]) -> tuple[int, int, int | None]:
    """(height, width, frames) the model generates by default: its UNet's sample size (SVD: 576×1024, 14/25)."""
    unets = pipeline.get("unets", {})
    facts = unets.get("unet_svd") or next(iter(unets.values()), {})
    side = int(facts.get("default_size", 512))
    frames = facts.get("num_frames") or facts.get("max_frames")
    return int(facts.get("default_height", side)), int(facts.get("default_width", side)), frames


def _opt_sizes(spec: ComponentSpec, pipeline: Mapping[str, Any], batch: int) -> dict[str, int]:
    height, width, frames = _default_size(pipeline)
    scale = int(pipeline.get("vae_scale_factor", 8))
    wanted = {BATCH: batch, "image_height": height, "image_width": width, "height": height // scale,
              "width": width // scale, "frames": frames or 1}
    if "unet_motion" in spec.name:
        wanted["frames"] = 16  # AnimateDiff's usual clip length
    wanted.update(derived_sizes(spec.dims, wanted))
    return {dim: min(max(wanted[dim], low), high) for dim, (low, high) in spec.dims.items() if dim in wanted}


def _load(cls_path: str) -> Callable[..., torch.nn.Module]:
    def load(source: ModelSource, subfolder: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        module_name, cls_name = cls_path.rsplit(".", 1)
        cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
        return cls.from_pretrained(source.model, subfolder=subfolder, torch_dtype=dtype,
                                   low_cpu_mem_usage=False).eval()

    return load


def _load_auto(source: ModelSource, subfolder: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers model of whatever class its config names (AutoencoderKL or the SVD temporal VAE, ...)."""
    from diffusers import AutoModel

    return AutoModel.from_pretrained(source.model, subfolder=subfolder, torch_dtype=dtype,
                                     low_cpu_mem_usage=False).eval()


# --- text encoder -----------------------------------------------------------------------------------

class _TextEncoder(torch.nn.Module):
    """Token ids and each prompt's adapters (`engines/adapters.py`) -> the last hidden states."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.lora = attach_lora_slots(model)

    def forward(self, input_ids: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor) -> torch.Tensor:
        self.lora.down, self.lora.up = lora_down, lora_up
        return self.model(input_ids.to(torch.int64))[0]


def _lora_specs(module: torch.nn.Module) -> tuple[TensorSpec, TensorSpec]:
    """The per-sample adapter inputs of a component that takes them (`engines/adapters.py`)."""
    total_in, total_out = lora_totals(module)
    return (TensorSpec(LORA_DOWN, "float32", (BATCH, total_in, LORA_RANK), (-0.05, 0.05), VALUES),
            TensorSpec(LORA_UP, "float32", (BATCH, LORA_RANK, total_out), (-0.05, 0.05), VALUES))


class _TextEncodersXL(torch.nn.Module):
    """SDXL's two text encoders, as `StableDiffusionXLPipeline.encode_prompt` uses them: each one's penultimate
    hidden states, concatenated, and the second's pooled projection."""

    def __init__(self, encoders: torch.nn.ModuleList):
        super().__init__()
        self.first, self.second = encoders

    def forward(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.first(input_ids.to(torch.int64), output_hidden_states=True).hidden_states[-2]
        second = self.second(input_ids_2.to(torch.int64), output_hidden_states=True)
        return torch.cat([first, second.hidden_states[-2]], dim=-1), second.text_embeds


def _load_text_encoders_xl(source: ModelSource, subfolder: str, dtype: torch.dtype = torch.float32
                           ) -> torch.nn.Module:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False)
    return torch.nn.ModuleList([
        CLIPTextModel.from_pretrained(source.model, subfolder=subfolder, **kwargs).eval(),
        CLIPTextModelWithProjection.from_pretrained(source.model, subfolder=subfolder + "_2", **kwargs).eval()])


def _text_encoder_xl_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    first, second = module[0].config, module[1].config
    seq = pipeline["max_length"]
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", (BATCH, seq), (0, first.vocab_size), (0, first.vocab_size - 1)),
                TensorSpec("input_ids_2", "int32", (BATCH, seq), (0, second.vocab_size),
                           (0, second.vocab_size - 1))),
        outputs=(TensorSpec("text_embeddings", "float32", (BATCH, seq, first.hidden_size + second.hidden_size)),
                 TensorSpec("text_embeds", "float32", (BATCH, second.projection_dim))),
        dims={BATCH: (1, MAX_BATCH)},
    )


def _text_encoder_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    cfg = module.config
    seq = pipeline["max_length"]
    return ComponentSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", (BATCH, seq), (0, cfg.vocab_size), (0, cfg.vocab_size - 1)),
                *_lora_specs(module)),
        outputs=(TensorSpec("text_embeddings", "float32", (BATCH, seq, cfg.hidden_size)),),
        dims={BATCH: (1, MAX_BATCH), LORA_RANK: (1, MAX_RANK)},
    )


# --- VAE encoder: image -> latent distribution (mean, log-variance) ----------------------------------

class _VaeEncoder(torch.nn.Module):
    """Returns the posterior's parameters, so the caller samples with its own seeded noise or takes the mode."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images).latent_dist
        return dist.mean, dist.logvar


def _vae_encoder_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    c = module.config.latent_channels
    latent = (BATCH, c, "height", "width")
    return ComponentSpec(
        name="vae_encoder",
        inputs=(TensorSpec("images", "float32", (BATCH, 3, "image_height", "image_width"), limits=VALUES),),
        outputs=(TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_logvar", "float32", latent)),
        dims=image_dims(pipeline["vae_scale_factor"]),
    )


# --- VAE decoder: latent (already divided by the scaling factor) -> image in [-1, 1] -----------------

class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


def _vae_decoder_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    c = module.config.latent_channels
    return ComponentSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", (BATCH, c, "height", "width"), limits=VALUES),),
        outputs=(TensorSpec("images", "float32", (BATCH, 3, "image_height", "image_width")),),
        dims=image_dims(pipeline["vae_scale_factor"]),
    )


# --- UNet: (sample, per-sample timestep, text embeddings) -> noise prediction ------------------------

class _UNet(torch.nn.Module):
    """Per-sample timesteps and adapters, so that requests at different steps and with different adapters
    share one call."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.lora = attach_lora_slots(unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                lora_down: torch.Tensor, lora_up: torch.Tensor):
        self.lora.down, self.lora.up = lora_down, lora_up
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def _denoiser_inputs(cfg: Any, pipeline: Mapping[str, Any], unet: str) -> tuple[TensorSpec, ...]:
    """(latents, per-sample timestep, text embeddings): the inputs a UNet and its ControlNet share; `unet` is
    the denoiser whose scheduler bounds the timesteps."""
    return (TensorSpec("sample", "float32", (BATCH, cfg.in_channels, "height", "width"), (-3.0, 3.0), VALUES),
            TensorSpec("timestep", "float32", (BATCH,), (0.0, 1000.0), timestep_limits(pipeline, unet)),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, pipeline["max_length"], cfg.cross_attention_dim),
                       limits=VALUES))


def _denoiser_dims(pipeline: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    dims = image_dims(pipeline["vae_scale_factor"])
    dims[BATCH] = (1, UNET_MAX_BATCH)
    return dims


def _unet_spec_named(name: str) -> Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]:
    def spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
        cfg = module.config
        dims = _denoiser_dims(pipeline)
        return ComponentSpec(
            name=name,
            inputs=(*_denoiser_inputs(cfg, pipeline, name), *_lora_specs(module)),
            outputs=(TensorSpec("noise_pred", "float32", (BATCH, cfg.out_channels, "height", "width")),),
            dims={**{k: v for k, v in dims.items() if k in (BATCH, "height", "width")}, LORA_RANK: (1, MAX_RANK)},
        )

    return spec


class _UNetXL(_UNet):
    """SDXL's UNet: its text-time conditioning (the pooled text `text_embeds` and the six size numbers
    `time_ids`: original size, crop corner, target size) as per-sample inputs."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor):
        self.lora.down, self.lora.up = lora_down, lora_up
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


# SDXL's size conditioning: up to 8192 pixels a side (any crop corner within), as a request can ask for them
TIME_ID_LIMITS = (0.0, 8192.0)


def _text_time_specs(cfg: Any, pipeline: Mapping[str, Any]) -> tuple[TensorSpec, TensorSpec]:
    """SDXL's text-time inputs of a UNet (or its ControlNet) of config `cfg`: the pooled text, the size numbers."""
    pooled = pipeline["text_embeds_dim"]
    time_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
    return (TensorSpec("text_embeds", "float32", (BATCH, pooled), limits=VALUES),
            TensorSpec("time_ids", "float32", (BATCH, time_ids), (64.0, 1024.0), TIME_ID_LIMITS))


def _with_text_time(plain: Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]
                    ) -> Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]:
    """The spec `plain` gives (a UNet's, a ControlNet's) with SDXL's text-time inputs after the text."""
    def spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
        base = plain(module, pipeline)
        inputs = list(base.inputs)
        inputs[3:3] = _text_time_specs(module.config, pipeline)
        return replace(base, inputs=tuple(inputs))

    return spec


def _unet_xl_spec_named(name: str) -> Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]:
    return _with_text_time(_unet_spec_named(name))


# --- ControlNet: (latents, timestep, text, control image) -> the residuals a UNet adds to its skips -------

def control_residuals(config: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(name, channels, downsampling) of each residual a ControlNet of this UNet config returns, in order: the
    input convolution's, each down block's layers' and its downsampler's (all but the last block), the mid
    block's (SD 1.5: 12 down residuals and the mid one)."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    out = [("down_0", channels[0], 1)]
    for i, width in enumerate(channels):
        out += [(f"down_{len(out) + j}", width, 2 ** i) for j in range(layers if isinstance(layers, int) else
                                                                        layers[i])]
        if i < len(channels) - 1:
            out.append((f"down_{len(out)}", width, 2 ** (i + 1)))
    out.append(("mid", channels[-1], 2 ** (len(channels) - 1)))
    return out


def _residual_specs(config: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name, "float32", (BATCH, width, _scaled("height", factor), _scaled("width", factor)),
                            limits=VALUES) for name, width, factor in control_residuals(config))


def _scaled(dim: str, factor: int) -> str:
    """The symbolic size of a latent dim after `factor`× downsampling (stride-2 convolutions round up)."""
    return dim if factor == 1 else f"{dim}/{factor}"


def _scaled_dims(dims: Mapping[str, tuple[int, int]], config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    factors = {factor for _, _, factor in control_residuals(config) if factor > 1}
    return {_scaled(dim, f): (-(-dims[dim][0] // f), -(-dims[dim][1] // f)) for dim in ("height", "width")
            for f in factors}


class _ControlNet(torch.nn.Module):
    """The residuals unscaled: each request's conditioning scale multiplies them in its loop."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False)
        return (*down, mid)


def _controlnet_spec_named(name: str) -> Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]:
    def spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
        cfg = module.config
        dims = _denoiser_dims(pipeline)
        return ComponentSpec(
            name=name,
            inputs=(
                *_denoiser_inputs(cfg, pipeline, next(iter(pipeline["unets"]))),
                TensorSpec("controlnet_cond", "float32", (BATCH, cfg.conditioning_channels, "image_height",
                                                          "image_width"), (0.0, 1.0), (0.0, 1.0)),
            ),
            outputs=_residual_specs(cfg),
            dims={**dims, **_scaled_dims(dims, cfg)},
        )

    return spec


class _ControlNetXL(_ControlNet):
    """An SDXL ControlNet: the UNet's text-time conditioning too."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor, controlnet_cond: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        down, mid = self.net(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})
        return (*down, mid)


class _UNetControlled(_UNet):
    """The UNet with a ControlNet's residuals added to its skip connections and mid block."""

    TEXT_TIME: tuple[str, ...] = ()  # inputs between the text and the residuals (SDXL's text-time conditioning)

    def __init__(self, unet: torch.nn.Module):
        super().__init__(unet)
        self.residuals = len(control_residuals(unet.config))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> torch.Tensor:
        added, rest = dict(zip(self.TEXT_TIME, rest)), rest[len(self.TEXT_TIME):]
        residuals, (lora_down, lora_up) = rest[:self.residuals], rest[self.residuals:]
        self.lora.down, self.lora.up = lora_down, lora_up
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1],
                         added_cond_kwargs=added or None, return_dict=False)[0]


class _UNetControlledXL(_UNetControlled):
    """SDXL's UNet with a ControlNet's residuals (after its text-time inputs)."""

    TEXT_TIME = ("text_embeds", "time_ids")


def _controlled_spec_named(name: str, plain: str, xl: bool = False
                           ) -> Callable[[torch.nn.Module, Mapping[str, Any]], ComponentSpec]:
    """The spec of the UNet `plain` (its timesteps; `xl`: SDXL's), named `name`, with the residuals after the
    text (and SDXL's text-time inputs), before the adapters."""
    def spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
        base = (_unet_xl_spec_named if xl else _unet_spec_named)(plain)(module, pipeline)
        inputs = list(base.inputs)
        at = 3 + len((_UNetControlledXL if xl else _UNetControlled).TEXT_TIME)
        inputs[at:at] = _residual_specs(module.config)
        return replace(base, name=name, inputs=tuple(inputs),
                       dims={**base.dims, **_scaled_dims(base.dims, module.config)})

    return spec


def timestep_limits(pipeline: Mapping[str, Any], unet: str) -> tuple[float, float]:
    """The timesteps the denoiser's scheduler can produce.

    Discrete schedulers count training steps: [0, num_train_timesteps]. SVD's EDM Euler scheduler takes
    continuous timesteps t = ¼·ln σ for σ in [sigma_min, sigma_max] (0.002 and 700: t in [−1.55, 1.64]);
    a hair of slack keeps float32 rounding of the ends inside.
    """
    config = pipeline["unets"][unet]["scheduler"]
    if config.get("timestep_type") != "continuous":
        return 0.0, float(config.get("num_train_timesteps", 1000))
    sigmas = [config.get("sigma_min"), config.get("sigma_max")]
    if None in sigmas:  # the range its training betas span
        import diffusers

        scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
        trained = scheduler.sigmas[scheduler.sigmas > 0]
        sigmas = [float(trained.min()) if sigmas[0] is None else sigmas[0],
                  float(trained.max()) if sigmas[1] is None else sigmas[1]]
    return 0.25 * math.log(sigmas[0]) - 1e-3, 0.25 * math.log(sigmas[1]) + 1e-3


# --- SVD: CLIP image encoder, spatio-temporal UNet, temporal VAE decoder ----------------------------

class _ImageEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).image_embeds


def _image_encoder_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    cfg = module.config
    side = cfg.image_size
    return ComponentSpec(
        name="image_encoder",
        inputs=(TensorSpec("pixel_values", "float32", (BATCH, 3, side, side), (-2.0, 2.0), VALUES),),
        outputs=(TensorSpec("image_embeds", "float32", (BATCH, cfg.projection_dim)),),
        dims={BATCH: (1, MAX_BATCH)},
    )


class _UNetSVD(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         added_time_ids=added_time_ids, return_dict=False)[0]


def _unet_svd_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    cfg = module.config
    dims = {k: v for k, v in image_dims(pipeline["vae_scale_factor"]).items() if k in (BATCH, "height", "width")}
    dims[BATCH] = (1, SVD_MAX_BATCH)
    dims["frames"] = (1, MAX_FRAMES)
    return ComponentSpec(
        name="unet_svd",
        inputs=(
            TensorSpec("sample", "float32", (BATCH, "frames", cfg.in_channels, "height", "width"), (-3.0, 3.0),
                       VALUES),
            TensorSpec("timestep", "float32", (BATCH,), (-1.5, 1.6), timestep_limits(pipeline, "unet_svd")),
            TensorSpec("encoder_hidden_states", "float32", (BATCH, 1, cfg.cross_attention_dim), limits=VALUES),
            TensorSpec("added_time_ids", "float32", (BATCH, len(_ADDED_TIME_IDS)), (0.0, 128.0), VALUES),
        ),
        outputs=(TensorSpec("noise_pred", "float32", (BATCH, "frames", cfg.out_channels, "height", "width")),),
        dims=dims,
    )


class _TemporalVaeDecoder(torch.nn.Module):
    """Decodes one chunk of consecutive frames of one video: the chunk's length is its frame count."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, num_frames=latent.shape[0]).sample


def _vae_decoder_temporal_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    dims = image_dims(pipeline["vae_scale_factor"])
    del dims[BATCH]
    dims["frames"] = (1, MAX_FRAMES)
    return ComponentSpec(
        name="vae_decoder_temporal",
        inputs=(TensorSpec("latent", "float32", ("frames", module.config.latent_channels, "height", "width"),
                           limits=VALUES),),
        outputs=(TensorSpec("images", "float32", ("frames", 3, "image_height", "image_width")),),
        dims=dims,
        batched=False,  # frames of one chunk are not independent requests: never merged by the server
    )


# --- Video LDM: SD UNet + motion adapter, each temporal layer merged with a runtime α -------------------

class _AlphaGate:
    """Holds the per-frame α of the current forward for every merged temporal layer."""

    alpha: torch.Tensor


class _AlphaMerged(torch.nn.Module):
    """α·(the layer's input) + (1 − α)·(its output): α = 1 skips the layer, α = 0 is the layer as trained."""

    def __init__(self, layer: torch.nn.Module, gate: _AlphaGate):
        super().__init__()
        self.layer = layer
        self.gate = gate

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.layer(hidden_states, *args, **kwargs)
        alpha = self.gate.alpha
        return alpha * hidden_states + (1 - alpha) * out


def _load_motion_unet(source: ModelSource, subfolder: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    if source.motion_adapter is None:
        raise InvalidInputError("unet_motion needs a motion adapter (--motion-adapter)")
    unet = UNet2DConditionModel.from_pretrained(source.model, subfolder=subfolder, torch_dtype=dtype,
                                                low_cpu_mem_usage=False)
    adapter = MotionAdapter.from_pretrained(source.motion_adapter, torch_dtype=dtype, low_cpu_mem_usage=False)
    return UNetMotionModel.from_unet2d(unet, adapter).eval()


class _UNetMotion(torch.nn.Module):
    """Takes one text embedding per video (repeated over its frames here) and a per-video α."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.gate = _AlphaGate()
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            modules = getattr(block, "motion_modules", None)
            for i, layer in enumerate(modules or ()):
                modules[i] = _AlphaMerged(layer, self.gate)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                alpha: torch.Tensor) -> torch.Tensor:
        batch, frames = sample.shape[0], sample.shape[2]
        self.gate.alpha = alpha[:, None].expand(batch, frames).flatten()[:, None, None, None]
        per_frame = encoder_hidden_states[:, None].expand(batch, frames, *encoder_hidden_states.shape[1:])
        return self.unet(sample, timestep, encoder_hidden_states=per_frame.flatten(0, 1), return_dict=False)[0]


def _unet_motion_spec(module: torch.nn.Module, pipeline: Mapping[str, Any]) -> ComponentSpec:
    cfg = module.config
    dims = {k: v for k, v in image_dims(pipeline["vae_scale_factor"]).items() if k in (BATCH, "height", "width")}
    dims[BATCH] = (1, UNET_MAX_BATCH)
    dims["frames"] = (1, int(cfg.motion_max_seq_length))
    return ComponentSpec(
        name="unet_motion",
        inputs=(
            TensorSpec("sample", "float32", (BATCH, cfg.in_channels, "frames", "height", "width"), (-3.0, 3.0),
                       VALUES),
            TensorSpec("timestep", "float32", (BATCH,), (0.0, 1000.0), timestep_limits(pipeline, "unet_motion")),
            TensorSpec("encoder_hidden_states", "float32",
                       (BATCH, pipeline["max_length"], cfg.cross_attention_dim), limits=VALUES),
            TensorSpec("alpha", "float32", (BATCH,), (0.0, 1.0), (0.0, 1.0)),
        ),
        outputs=(TensorSpec("noise_pred", "float32", (BATCH, cfg.out_channels, "frames", "height", "width")),),
        dims=dims,
    )


_ADDED_TIME_IDS = ("fps_minus_one", "motion_bucket_id", "noise_aug_strength")
SVD_MAX_BATCH = 8
MAX_FRAMES = 64

_IMAGE_SIZES = ({BATCH: 2, "image_height": 72, "image_width": 40, "height": 9, "width": 5, LORA_RANK: 3},
                {BATCH: 1, "image_height": 64, "image_width": 48, "height": 8, "width": 6, LORA_RANK: 1})
_TEXT_SIZES = ({BATCH: 2, LORA_RANK: 3}, {BATCH: 1, LORA_RANK: 1})
_MOTION_SIZES = ({BATCH: 2, "frames": 3, "height": 9, "width": 5}, {BATCH: 1, "frames": 2, "height": 8, "width": 6})
_VIDEO_SIZES = ({BATCH: 2, "frames": 3, "image_height": 72, "image_width": 40, "height": 9, "width": 5},
                {BATCH: 1, "frames": 2, "image_height": 64, "image_width": 48, "height": 8, "width": 6})

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("text_encoder", "text_encoder", _load("transformers.CLIPTextModel"), _TextEncoder,
                  _text_encoder_spec, _TEXT_SIZES, opt_batch=2),
        Component("vae_encoder", "vae", _load_auto, _VaeEncoder, _vae_encoder_spec, _IMAGE_SIZES),
        Component("vae_decoder", "vae", _load_auto, _VaeDecoder, _vae_decoder_spec, _IMAGE_SIZES),
        Component("unet", "unet", _load_auto, _UNet, _unet_spec_named("unet"), _IMAGE_SIZES, opt_batch=2),
        # three guidance branches: [uncond, image-only, text+image]
        Component("unet_pix2pix", "unet", _load_auto, _UNet, _unet_spec_named("unet_pix2pix"), _IMAGE_SIZES,
                  opt_batch=3),
        # inpainting: 9 input channels = noise latent ‖ mask ‖ masked-image latent
        Component("unet_inpaint", "unet", _load_auto, _UNet, _unet_spec_named("unet_inpaint"), _IMAGE_SIZES,
                  opt_batch=2),
        Component("image_encoder", "image_encoder", _load("transformers.CLIPVisionModelWithProjection"),
                  _ImageEncoder, _image_encoder_spec, _TEXT_SIZES),
        Component("unet_svd", "unet", _load_auto, _UNetSVD, _unet_svd_spec, _VIDEO_SIZES, opt_batch=2),
        # fp32 even in an fp16 export or a bf16 run, as NVIDIA's demo keeps SVD's temporal VAE decoder
        Component("vae_decoder_temporal", "vae", _load_auto, _TemporalVaeDecoder, _vae_decoder_temporal_spec,
                  _VIDEO_SIZES, fp16=False, bf16=False),
        Component("unet_motion", "unet", _load_motion_unet, _UNetMotion, _unet_motion_spec, _MOTION_SIZES,
                  opt_batch=2),
        # with a ControlNet's residuals (`ti2i export --controlnet`)
        Component("unet_control", "unet", _load_auto, _UNetControlled, _controlled_spec_named("unet_control", "unet"),
                  _IMAGE_SIZES, opt_batch=2),
        Component("unet_inpaint_control", "unet", _load_auto, _UNetControlled,
                  _controlled_spec_named("unet_inpaint_control", "unet_inpaint"), _IMAGE_SIZES, opt_batch=2),
        # SDXL: served under the SD names its family's methods call
        Component("text_encoder_xl", "text_encoder", _load_text_encoders_xl, _TextEncodersXL, _text_encoder_xl_spec,
                  _TEXT_SIZES, opt_batch=2, served="text_encoder"),
        # SDXL's VAE overflows in fp16 (NaN images): fp32 in an fp16 export, as diffusers upcasts it
        Component("vae_encoder_xl", "vae", _load_auto, _VaeEncoder, _vae_encoder_spec, _IMAGE_SIZES, fp16=False,
                  served="vae_encoder"),
        Component("vae_decoder_xl", "vae", _load_auto, _VaeDecoder, _vae_decoder_spec, _IMAGE_SIZES, fp16=False,
                  served="vae_decoder"),
        Component("unet_xl", "unet", _load_auto, _UNetXL, _unet_xl_spec_named("unet"), _IMAGE_SIZES, opt_batch=2,
                  served="unet"),
        Component("unet_pix2pix_xl", "unet", _load_auto, _UNetXL, _unet_xl_spec_named("unet_pix2pix"), _IMAGE_SIZES,
                  opt_batch=3, served="unet_pix2pix"),
        Component("unet_inpaint_xl", "unet", _load_auto, _UNetXL, _unet_xl_spec_named("unet_inpaint"), _IMAGE_SIZES,
                  opt_batch=2, served="unet_inpaint"),
        # the SDXL refiner's UNet: the second encoder's text only, aesthetic scores for the target size
        Component("unet_refiner", "unet", _load_auto, _UNetXL, _unet_xl_spec_named("unet_refiner"), _IMAGE_SIZES,
                  opt_batch=2),
        Component("unet_control_xl", "unet", _load_auto, _UNetControlledXL,
                  _controlled_spec_named("unet_control", "unet", xl=True), _IMAGE_SIZES, opt_batch=2,
                  served="unet_control"),
        Component("unet_inpaint_control_xl", "unet", _load_auto, _UNetControlledXL,
                  _controlled_spec_named("unet_inpaint_control", "unet_inpaint", xl=True), _IMAGE_SIZES, opt_batch=2,
                  served="unet_inpaint_control"),
    )
}

def controlnet_component(name: str, xl: bool = False) -> Component:
    """A ControlNet (`xl`: of an SDXL model), served as ``controlnet_<name>``; its weights come from the folder
    its source names."""
    full = CONTROLNET_PREFIX + name
    spec = _controlnet_spec_named(full)
    wrap, spec = (_ControlNetXL, _with_text_time(spec)) if xl else (_ControlNet, spec)
    return Component(full, None, _load("diffusers.ControlNetModel"), wrap, spec, _IMAGE_SIZES, opt_batch=2)


# The declaration of the UNet that takes a ControlNet's residuals, by the kind's denoiser declaration.
CONTROLLED_DECLARATIONS = {"unet": "unet_control", "unet_inpaint": "unet_inpaint_control",
                           "unet_xl": "unet_control_xl", "unet_inpaint_xl": "unet_inpaint_control_xl"}

# Which components each model kind exports, its denoiser last (the kind is detected from the model folder).
KIND_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd": ("text_encoder", "vae_encoder", "vae_decoder", "unet"),
    "pix2pix": ("text_encoder", "vae_encoder", "vae_decoder", "unet_pix2pix"),
    "inpaint": ("text_encoder", "vae_encoder", "vae_decoder", "unet_inpaint"),
    "svd": ("image_encoder", "vae_encoder", "vae_decoder_temporal", "unet_svd"),
    "videoldm": ("text_encoder", "vae_encoder", "vae_decoder", "unet", "unet_motion"),
    "sdxl": ("text_encoder_xl", "vae_encoder_xl", "vae_decoder_xl", "unet_xl"),
    "sdxl_pix2pix": ("text_encoder_xl", "vae_encoder_xl", "vae_decoder_xl", "unet_pix2pix_xl"),
    "sdxl_inpaint": ("text_encoder_xl", "vae_encoder_xl", "vae_decoder_xl", "unet_inpaint_xl"),
    # joins its base's directory: the base's second text encoder (the same weights) serves it
    "sdxl_refiner": ("vae_encoder_xl", "vae_decoder_xl", "unet_refiner"),
}
KIND_BY_UNET_CHANNELS = {4: "sd", 8: "pix2pix", 9: "inpaint"}
SDXL_KIND_BY_UNET_CHANNELS = {4: "sdxl", 8: "sdxl_pix2pix", 9: "sdxl_inpaint"}
