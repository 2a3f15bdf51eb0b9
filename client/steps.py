"""Steps shared by every method: prompt and image encoding, seeded noise, guidance, schedulers, decoding.

Each reproduces the corresponding piece of the diffusers pipelines (same order of random draws from
the same `torch.Generator`, same arithmetic), so the methods built on them match seed for seed.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ti2i.client.control import Control, controlled, prepare_control  # noqa: F401 - shared steps
from ti2i.client.lora import with_lora
from ti2i.client.registry import METHODS, SEED
from ti2i.client.schedulers import MODEL_SCHEDULER, SCHEDULER_NAMES, scheduler_help
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.runner import Runner

T = TypeVar("T")
# A method's `progress`: True shows a progress bar, False nothing; a callable is told (loop, steps done, steps)
# before the first step and after each, so a server can report progress and stop a cancelled loop (by raising).
Progress = Union[bool, Callable[[str, int, int], None]]


def progress_steps(items: Iterable[T], desc: str, progress: Progress) -> Iterator[T]:
    """A loop's items, with the progress `progress` asks for."""
    if not callable(progress):
        yield from tqdm(items, desc=desc, disable=not progress)
        return
    items = list(items)
    progress(desc, 0, len(items))
    for i, item in enumerate(items):
        yield item
        progress(desc, i + 1, len(items))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a runner output (copied only when read-only, as tritonclient's results are)."""
    return torch.from_numpy(np.require(array, requirements="W"))


# The component calls below go through `runner.run_tensors`: torch tensors in and out on `runner.device`, so
# that a runner whose engines live on a GPU keeps a whole loop there; a numpy runner (Triton, ONNX Runtime on
# the CPU) sees exactly the arrays it always did.

def _encode(runner: Runner, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """`encode_prompt`'s outputs for the prompts, one request for all of them."""
    return runner.run_tensors("encode_prompt", text=np.array([p.encode("utf-8") for p in prompts], dtype=object))


def encode_prompts(runner: Runner, prompts: Sequence[str]) -> torch.Tensor:
    """Text embeddings [N, S, D] of the prompts, one request for all of them."""
    return _encode(runner, prompts)["text_embeddings"]


def is_sdxl(pipeline: dict[str, Any]) -> bool:
    """An SDXL model's facts (its second tokenizer)."""
    return "tokenizer_2" in pipeline


def encode_prompt_cfg(runner: Runner, prompt: str, negative_prompt: str | None, guidance: bool,
                      force_zeros: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[uncond, cond] embeddings with guidance (uncond = the negative prompt or ""), else [cond]; and the further
    UNet inputs the prompt gives, laid out the same (SDXL: its pooled text `text_embeds`; a left-out negative
    prompt is zeros, not "", where the SDXL model says so (`force_zeros`: where the caller's UNet does), as
    `StableDiffusionXLPipeline.encode_prompt`)."""
    if force_zeros is None:
        force_zeros = runner.pipeline.get("force_zeros_for_empty_prompt", False)
    zeros = guidance and negative_prompt is None and force_zeros
    texts = [prompt] if not guidance or zeros else [negative_prompt or "", prompt]
    out = _encode(runner, texts)
    tensors = {name: out[name] for name in ("text_embeddings", "text_embeds") if name in out}
    if zeros:
        tensors = {name: torch.cat([torch.zeros_like(value), value]) for name, value in tensors.items()}
    return tensors.pop("text_embeddings"), tensors


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning a request may set: the size the image is said to have had before resizing and
    the corner it is said to have been cropped at (None: the output's size, uncropped, as the pipelines' defaults).
    Models without size conditioning (SD 1.x) refuse them."""

    original_height: int | None = None
    original_width: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def time_ids(self, height: int, width: int, aesthetic_score: float | None = None) -> list[float]:
        """original size + crop corner + target size (the output's), as `_get_add_time_ids` lays them out; for a
        refiner, the aesthetic score in place of the target size."""
        corner = [self.original_height or height, self.original_width or width, self.crop_top or 0,
                  self.crop_left or 0]
        return [*corner, aesthetic_score] if aesthetic_score is not None else [*corner, height, width]


def size_conditions(conditions: dict[str, torch.Tensor], height: int, width: int,
                    sizes: SizeConditioning = SizeConditioning(),
                    aesthetic_scores: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """The prompt's UNet inputs with SDXL's size conditioning for a height×width output (`time_ids`), one row per
    prompt row (a refiner's: each row its aesthetic score); other models' unchanged (and a size condition asked
    of them is an error)."""
    if "text_embeds" not in conditions:
        given = [name for name, value in vars(sizes).items() if value is not None]
        if given:
            raise InvalidInputError(f"{given[0]} is an SDXL size condition: this model has no size conditioning")
        return conditions
    pooled = conditions["text_embeds"]
    rows = [sizes.time_ids(height, width, score) for score in aesthetic_scores or [None] * pooled.shape[0]]
    return {**conditions, "time_ids": torch.tensor(rows, dtype=pooled.dtype, device=pooled.device)}


def model_default(pipeline: dict[str, Any], method: str, name: str, value: Any) -> Any:
    """`value`, or when left out `method`'s default of parameter `name` for this model (the SDXL pipelines
    default some parameters otherwise than SD's)."""
    if value is not None:
        return value
    param = METHODS[method].param(name)
    return param.sdxl_default if is_sdxl(pipeline) and param.sdxl_default is not None else param.default


def method_runner(runner: Runner, method: str, lora: Sequence[str] = ()) -> Runner:
    """The runner `method`'s loop calls: bound to the model family that serves it, with the request's adapters.
    An SDXL family (two tokenizers) serves the methods written for SDXL's UNet only."""
    runner = runner.for_method(method)
    if is_sdxl(runner.pipeline) and not METHODS[method].sdxl:
        raise InvalidInputError(f"{method} does not run on an SDXL model (on SDXL: "
                                f"{', '.join(m.name for m in METHODS.values() if m.sdxl)})")
    return with_lora(runner, lora)


def encode_image(runner: Runner, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, log-variance) of a uint8 [B, H, W, 3] image."""
    out = runner.run_tensors("encode_image", image=image)
    return out["latent_mean"], out["latent_logvar"]


def preprocess_image(runner: Runner, image: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1], for methods that edit pixels before encoding."""
    return runner.run_tensors("image_preprocess", image=image)["images"]


def encode_pixels(runner: Runner, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, log-variance) of float [B, 3, H, W] images in [-1, 1]."""
    out = runner.run_tensors("vae_encoder", images=images.contiguous())
    return out["latent_mean"], out["latent_logvar"]


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`latent_dist.sample(generator)` of diffusers' DiagonalGaussianDistribution."""
    return mean + torch.exp(0.5 * logvar) * noise_like(mean, generator)


def noise_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of x's shape on x's device, drawn from the generator as diffusers' `randn_tensor`
    (a CPU generator draws on the CPU, then the noise moves to the device once)."""
    return randn(x.shape, generator, x.device, x.dtype)


def randn(shape: Sequence[int], generator: torch.Generator, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn as diffusers' `randn_tensor` (see `noise_like`)."""
    return randn_tensor(tuple(shape), generator=generator, device=torch.device(device), dtype=dtype)


def decode_latents(runner: Runner, latents: torch.Tensor, scaling_factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Latents -> (uint8 [B, H, W, 3], float [B, H, W, 3] in [0, 1]), on the host: a method's result."""
    out = runner.run_to_host("decode_image", latent=latents / scaling_factor)
    return out["image"], out["image_float"]


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale·(cond − uncond)."""
    return uncond + scale * (cond - uncond)


def classifier_free_guidance(noise_pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Guidance on a [uncond, cond] batch."""
    return guide(*noise_pred.chunk(2), scale)


def run_unet(runner: Runner, model: str, sample: torch.Tensor, t: torch.Tensor | float,
             encoder_hidden_states: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
    """One UNet call; the timestep is sent per sample so the server can batch requests at different steps."""
    timestep = torch.full((sample.shape[0],), float(t), dtype=torch.float32, device=sample.device)
    out = runner.run_tensors(model, sample=sample.contiguous(), timestep=timestep,
                             encoder_hidden_states=encoder_hidden_states.contiguous(),
                             **{name: value.contiguous() for name, value in conditions.items()})
    return out["noise_pred"]


def guided_noise_pred(runner: Runner, model: str, scheduler, latents: torch.Tensor, t: torch.Tensor | float,
                      prompt_embeds: torch.Tensor, guidance: float, do_cfg: bool,
                      extra_channels: torch.Tensor | None = None, control: Control | None = None,
                      step: tuple[int, int] = (0, 1), **conditions: torch.Tensor) -> torch.Tensor:
    """One denoiser evaluation as the reference loops write it: the [uncond, cond] batch with guidance,
    the scheduler-scaled latents (then `extra_channels`, unscaled, concatenated after them), guidance.
    `conditions` are further UNet inputs, already laid out for the batch (e.g. Video LDM's α); with `control`,
    its ControlNet's residuals for the scaled latents at `step` (index, count) join them."""
    model_input = torch.cat([latents] * 2) if do_cfg else latents
    model_input = scheduler.scale_model_input(model_input, t)
    if control is not None:
        timestep = torch.full((model_input.shape[0],), float(t), dtype=torch.float32, device=model_input.device)
        conditions = {**control.residuals(runner, model_input.contiguous(), timestep, prompt_embeds.contiguous(),
                                          *step, **conditions), **conditions}
        model = controlled(model, control)
    if extra_channels is not None:
        model_input = torch.cat([model_input, extra_channels], dim=1)
    noise_pred = run_unet(runner, model, model_input, t, prompt_embeds, **conditions)
    return classifier_free_guidance(noise_pred, guidance) if do_cfg else noise_pred


def unet_facts(pipeline: dict[str, Any], unet: str) -> dict[str, Any]:
    if unet not in pipeline["unets"]:
        raise ModelNotFoundError(f"these engines have no {unet!r} (they have {sorted(pipeline['unets'])}); "
                                 f"export a model of that kind into the engine directory")
    return pipeline["unets"][unet]


# Schedulers whose noise comes from their own sampler rather than `step`'s generator: seeded from the request.
SEEDED_BY_CONFIG = {"DPMSolverSDEScheduler": "noise_sampler_seed"}


def scheduler_class(name: str) -> tuple[str, dict[str, Any]]:
    """A user's scheduler name (short name or diffusers class name) -> (class name, settings); one clear error
    for anything else, before any work is done."""
    if name in SCHEDULER_NAMES:
        return SCHEDULER_NAMES[name]
    import diffusers

    cls = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise InvalidInputError(f"unknown scheduler {name!r}: use {scheduler_help()}")
    return name, {}


def check_scheduler(name: str) -> None:
    if name != MODEL_SCHEDULER:
        scheduler_class(name)


def make_scheduler(pipeline: dict[str, Any], unet: str, name: str = MODEL_SCHEDULER, seed: int | None = None,
                   **overrides: Any):
    """The scheduler `unet`'s model folder ships, or `name` (a short name or class name) built from its config
    as diffusers' `from_config` does; `seed` seeds a scheduler that draws its own noise."""
    import diffusers

    config = dict(unet_facts(pipeline, unet)["scheduler"])
    settings: dict[str, Any] = {}
    if name != MODEL_SCHEDULER:
        cls_name, settings = scheduler_class(name)
        cls = getattr(diffusers, cls_name)
        # another class: leave out the settings it has no use for (they would only warn)
        accepted = set(inspect.signature(cls.__init__).parameters)
        config = {k: v for k, v in config.items() if k in accepted or k.startswith("_")}
    else:
        cls = getattr(diffusers, config["_class_name"])
    if cls.__name__ in SEEDED_BY_CONFIG and seed is not None:
        settings = {**settings, SEEDED_BY_CONFIG[cls.__name__]: seed}
    return copy.deepcopy(_scheduler_template(cls.__name__, json.dumps({**config, **settings, **overrides},
                                                                      sort_keys=True)))


@functools.lru_cache(maxsize=32)
def _scheduler_template(class_name: str, config: str):
    """A scheduler built by diffusers' `from_config`, which each request copies: `from_config` reads the class's
    signature at every call, five times what a copy of the built scheduler costs."""
    import diffusers

    return getattr(diffusers, class_name).from_config(json.loads(config))


def set_timesteps(scheduler, steps: int) -> None:
    """`scheduler.set_timesteps`, its refusals (LCM: more steps than its original schedule) as clear errors."""
    try:
        scheduler.set_timesteps(steps)
    except ValueError as err:
        raise InvalidInputError(f"{type(scheduler).__name__} cannot take {steps} steps: {err}") from None


def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that `strength` selects, as diffusers' img2img `get_timesteps`."""
    set_timesteps(scheduler, steps)
    init_timestep = min(int(steps * strength), steps)
    t_start = max(steps - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    if len(timesteps) == 0:
        raise InvalidInputError(f"strength {strength} with {steps} steps runs no denoising step "
                                f"(needs strength × steps ≥ 1)")
    return timesteps


def step_kwargs(scheduler, generator: torch.Generator, eta: float) -> dict[str, Any]:
    """The extra `scheduler.step` arguments the scheduler accepts (eta for DDIM, the generator for noise)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidInputError(f"{name} must be in {bracket}{low}, {high}], got {value}")


def check_finite(**values: float) -> None:
    """Guidance scales and the like: any real number, but not NaN or infinite."""
    for name, value in values.items():
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int past float's range
            finite = False
        if not finite:
            raise InvalidInputError(f"{name} must be a finite number, got {value}")


def whole(value: Any) -> bool:
    """Whether `value` is an integer (a float with no fraction included); False for NaN, ±inf or text."""
    try:
        return int(value) == value
    except (OverflowError, TypeError, ValueError):
        return False


def generator(seed: int) -> torch.Generator:
    """The CPU generator the reference pipelines draw from, seeded after the record's check of the seed
    (torch overflows past 64 bits and takes -1 for 2**64 - 1)."""
    return torch.Generator("cpu").manual_seed(SEED.check(seed))


def most_steps(pipeline: dict[str, Any], unet: str) -> int:
    """The most steps `unet`'s scheduler can take: its training timesteps, less the offset "leading" spacing
    adds to each (SD's PNDM at 1000 steps would reach timestep 1000, past the end). Past that count DDIM
    refuses and PNDM runs every step at one timestep, and a count without bound sizes the schedule's arrays."""
    config = unet_facts(pipeline, unet)["scheduler"]
    most = config.get("num_train_timesteps", 1000)
    if config.get("timestep_spacing", "leading") == "leading":
        most -= config.get("steps_offset", 0)
    return most


def check_steps(steps: int, at_most: int | None = None) -> None:
    """A positive integer, at most `at_most` (the scheduler's `most_steps`)."""
    if not whole(steps) or steps < 1:
        raise InvalidInputError(f"steps must be a positive integer, got {steps}")
    if at_most is not None and steps > at_most:
        raise InvalidInputError(f"steps must be at most {at_most} (the most the scheduler's training timesteps "
                                f"allow), got {steps}")
