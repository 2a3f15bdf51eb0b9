"""One record per method: what the CLI, the demo, the benchmark and the served method models read.

A record names the method's function (imported only when called, so reading the records stays
cheap), its parameters (the function's keywords, which are also the CLI's flags with ``-`` for ``_``
and the served method model's input tensors), the image inputs it takes, the models it calls, its
output kind and its diffusers reference. Each parameter's kind and range are checked here
(`Param.check`, `Method.check`), by the served request's reader and by every call of a record, so the
CLI, the server and the benchmark refuse a value with the same message; checks that need the model
(steps against its scheduler, sizes against the pixel limit) stay in the method function. Adding a
method is its loop file plus one record here.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ti2i.client.schedulers import MODEL_SCHEDULER, scheduler_help
from ti2i.errors import InvalidInputError

# A method model's streaming (decoupled) twin is served as METHOD + STREAM_SUFFIX.
STREAM_SUFFIX = "_stream"

_IMAGE_EDIT = ("encode_prompt", "encode_image", "decode_image")

# Integer parameters travel as INT64 tensors: a bound left open is the int64 range's.
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1


def _number(value: float) -> str:
    """A bound as a person reads it (the int64 ends as powers of two)."""
    if value == INT64_MAX:
        return "2**63 - 1"
    if value == INT64_MIN:
        return "-2**63"
    return str(value)


def _shown(value: Any) -> str:
    """A refused value for a one-line message: long ones cut (a 400-digit number is still one line)."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


@dataclass(frozen=True)
class Param:
    """One keyword of a method: CLI flag ``--name-with-dashes``, served input tensor ``name``."""

    name: str
    kind: type  # float, int, str or bool
    default: Any = None  # None: the function decides (left out of the call)
    help: str = ""
    required: bool = False
    low: float | None = None  # the range `check` enforces (ints: within INT64), shown in the CLI's help
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    many: bool = False  # several values (text): the CLI flag repeats, the served tensor has one element each
    # SDXL's pipelines' default where it differs: then a left-out value is the method function's to choose, as it
    # knows the model (`steps.model_default`)
    sdxl_default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        low = "-∞" if self.low is None else _number(self.low) if self.kind is int else f"{self.low:g}"
        high = "∞" if self.high is None else _number(self.high) if self.kind is int else f"{self.high:g}"
        return f"{'(' if self.low_open else '['}{low}, {high}]"

    def allowed(self) -> str:
        """What the value must be, for error messages: "a positive integer below 2**63", "in (0.0, 1.0]"."""
        if self.kind is int:
            if self.low in (0, 1) and self.high is None:
                return f"a {'positive' if self.low else 'non-negative'} integer below 2**63"
            low = INT64_MIN if self.low is None else self.low
            return f"an integer in [{_number(low)}, {_number(INT64_MAX if self.high is None else self.high)}]"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{float(self.low)}, {float(self.high)}]"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '≥'} {float(self.low)}"
        if self.high is not None:
            return f"a finite number ≤ {float(self.high)}"
        return "a finite number"

    def check(self, value: Any) -> Any:
        """`value` as this parameter's kind, or an InvalidInputError naming it and its range.

        Integers must fit the wire's INT64 (numpy and torch overflow past it), floats must be finite, so
        no out-of-range value reaches a scheduler, a generator or an array size."""
        if self.kind is bool:
            return bool(value)
        if self.many:
            values = (value,) if isinstance(value, str) else value
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
                raise InvalidInputError(f"{self.name} must be text or a list of texts, got {_shown(repr(value))}")
            return tuple(values)
        if self.kind is str:
            if not isinstance(value, str):
                raise InvalidInputError(f"{self.name} must be text, got {type(value).__name__}")
            if self.choices and value not in self.choices:
                raise InvalidInputError(f"{self.name} must be one of {', '.join(self.choices)}, "
                                        f"got {_shown(repr(value))}")
            return value
        number = _real(value)
        if self.kind is int:
            if number is None or not (isinstance(number, int) or number.is_integer()):
                raise InvalidInputError(f"{self.name} must be {self.allowed()}, got {_shown(value)}")
            number = int(number)
            low = INT64_MIN if self.low is None else self.low
            high = INT64_MAX if self.high is None else min(self.high, INT64_MAX)
        else:
            if number is None or not math.isfinite(_float(number)):
                raise InvalidInputError(f"{self.name} must be {self.allowed()}, got {_shown(value)}")
            number = float(number)
            low = -math.inf if self.low is None else self.low
            high = math.inf if self.high is None else self.high
        if not ((low < number if self.low_open else low <= number) and number <= high):
            raise InvalidInputError(f"{self.name} must be {self.allowed()}, got {_shown(value)}")
        return number


def _real(value: Any) -> int | float | None:
    """A Python int or float of a number (numpy's included), None for anything else (text, bool, None)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _float(number: int | float) -> float:
    """An int too large for a float is infinite here, not an OverflowError."""
    try:
        return float(number)
    except OverflowError:
        return math.inf if number > 0 else -math.inf


@dataclass(frozen=True)
class Reference:
    """The diffusers pipeline a method reproduces, for the benchmark's reference backends.

    `kwargs` maps pipeline keywords to our parameter names; `prompt_fn`/`clip_fn` are the pipeline's
    own prompt- and CLIP-encoding methods (timed as stages); `scheduler` replaces the folder's."""

    pipeline: str
    kwargs: Mapping[str, str]
    prompt_fn: str | None = "encode_prompt"
    clip_fn: str | None = None
    scheduler: str | None = None
    output: str = "images"  # the pipeline output's field: "images" or "frames"
    sdxl_pipeline: str | None = None  # the SDXL counterpart (its prompt encoding is `encode_prompt`)


@dataclass(frozen=True)
class Method:
    name: str
    function: str  # "module:function"
    help: str
    output: str  # "image" or "video"
    unet: str  # the UNet its loop calls (the benchmark times single calls of it)
    models: tuple[str, ...]  # the served models it calls
    kind: str  # the model kind (benchmark presets): sd, pix2pix, inpaint, svd, videoldm
    params: tuple[Param, ...]
    images: tuple[str, ...] = ("image",)  # image inputs, in call order
    image_help: Mapping[str, str] = field(default_factory=dict)
    optional_images: tuple[str, ...] = ()  # image inputs a request may leave out (a ControlNet's control image)
    size_default: str = "the input image's"
    out_help: str = ""
    reference: Reference | None = None
    latent_layout: str = "BCHW"  # the UNet sample's layout (previews take its first frame's 4 latent channels)
    sdxl: bool = False  # also runs on SDXL models (their two text encoders and text-time UNet)

    def func(self) -> Callable[..., Any]:
        module, name = self.function.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def all_images(self) -> tuple[str, ...]:
        return (*self.images, *self.optional_images)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        """Each parameter's default (None: the method function's, by model)."""
        return {p.name: None if p.sdxl_default is not None else p.default for p in self.params}

    @property
    def size_from_image(self) -> bool:
        """Whether a left-out height or width is the input image's (else the model decides it)."""
        return self.size_default == _IMAGE_SIZE

    def check(self, call: Mapping[str, Any]) -> dict[str, Any]:
        """The call with each parameter's value checked against its record (`Param.check`); other keywords
        (images, the function's own extras) pass as they are."""
        params = {p.name: p for p in self.params}
        return {k: params[k].check(v) if k in params and v is not None else v for k, v in call.items()}

    def __call__(self, runner: Any, progress: Any = False, **kwargs: Any) -> Any:
        """Run the method: images and parameters by name; parameters left out (or None) take the defaults."""
        call = self.check({k: v for k, v in kwargs.items() if v is not None})
        return self.func()(runner, **call, progress=progress)


# torch seeds from [-2**63, 2**64) with -1 ≡ 2**64 - 1, the wire carries INT64: [0, 2**63) is each seed once.
SEED = Param("seed", int, 0, "random seed (the reference pipeline's generator seed)", low=0, high=INT64_MAX)


def _seed() -> Param:
    return SEED


def _size(default: str) -> tuple[Param, Param]:
    return (Param("height", int, None, f"output height (snapped to a multiple of 8; default: {default})", low=1),
            Param("width", int, None, f"output width (snapped to a multiple of 8; default: {default})", low=1))


SCHEDULER = Param("scheduler", str, MODEL_SCHEDULER, f"the sampling scheduler: {scheduler_help()}")
LORA = Param("lora", str, (), "a LoRA adapter and its weight, NAME[:SCALE] (repeat for several; they add): in-process "
                             "a .safetensors file or its folder, on a server a name `ti2i serve --lora` registered",
             many=True)


def _steps(default: int) -> Param:
    return Param("steps", int, default, "denoising steps", low=1)


def _by_model(text: str, default: float, sdxl: float | None) -> str:
    return text if sdxl is None else f"{text} (default: {default:g}; on SDXL models {sdxl:g}, the SDXL pipeline's)"


def _strength(default: float, text: str = "how much of the schedule runs (noise added to the input)",
              sdxl: float | None = None) -> Param:
    return Param("strength", float, default, _by_model(text, default, sdxl), low=0.0, high=1.0, low_open=True,
                 sdxl_default=sdxl)


def _guidance(default: float, text: str = "classifier-free guidance scale (≤ 1: no guidance)",
              sdxl: float | None = None) -> Param:
    return Param("guidance", float, default, _by_model(text, default, sdxl), sdxl_default=sdxl)


def _control(scale: float) -> tuple[Param, ...]:
    """A ControlNet's parameters (its image is the optional image input `control_image`)."""
    return (Param("controlnet", str, None, "the ControlNet to use (`ti2i export --controlnet`; default: the only one)"),
            Param("control_scale", float, scale, "how strongly the control image steers (the residuals' scale)"),
            Param("control_start", float, 0.0, "fraction of the steps before the ControlNet starts", low=0.0, high=1.0),
            Param("control_end", float, 1.0, "fraction of the steps after which it stops", low=0.0, high=1.0))


# SDXL's size conditioning (`steps.SizeConditioning`), up to the 8192 px a side its UNet inputs allow
SDXL_SIZES = (
    Param("original_height", int, None, "SDXL: the height the image is said to have had before resizing (size "
                                        "conditioning; default: the output's)", low=1, high=8192),
    Param("original_width", int, None, "SDXL: the width it is said to have had (default: the output's)", low=1,
          high=8192),
    Param("crop_top", int, None, "SDXL: the top of the crop it is said to have been cut at (default 0)", low=0,
          high=8192),
    Param("crop_left", int, None, "SDXL: the left of that crop (default 0)", low=0, high=8192))

REFINE = (
    Param("refine", float, None, "SDXL: hand the rest of the schedule to the family's refiner after this fraction "
                                 "of it (diffusers' denoising_end/denoising_start; default: no refiner)",
          low=0.0, high=1.0, low_open=True),
    Param("aesthetic_score", float, None, "SDXL refiner: the aesthetic score it is conditioned on (default 6)"),
    Param("negative_aesthetic_score", float, None, "SDXL refiner: the unconditional branch's score (default 2.5)"))
REFINER = "unet_refiner"  # an SDXL refiner's UNet (`ti2i export` into its base's directory)

CONTROLNET_PREFIX = "controlnet_"  # a ControlNet is served as controlnet_<name> (`ti2i export --controlnet`)
# The UNet that takes a ControlNet's residuals, by the UNet a method calls without one.
CONTROLLED_UNETS = {"unet": "unet_control", "unet_inpaint": "unet_inpaint_control"}
CONTROL_IMAGE = {"control_image": "a ControlNet's control image (a canny, depth or pose map you made)"}
PROMPT = Param("prompt", str, None, "describes the output", required=True)
NEGATIVE = Param("negative_prompt", str, None, "what to steer away from (the unconditional prompt)")
SOURCE = Param("source_prompt", str, None, "describes the input image", required=True)

_IMAGE_SIZE = "the input image's"
_MODEL_SIZE = "the model's, 512 for SD 1.5"
_VIDEO_OUT = "output video: OUT.mp4 (H.264), OUT.gif, or a folder for PNG frames"

METHODS: dict[str, Method] = {m.name: m for m in (
    Method(
        "txt2img", "ti2i.client.txt2img:txt2img", "text-to-image", "image", "unet",
        ("encode_prompt", "decode_image", "unet"), "sd",
        (PROMPT, NEGATIVE, _steps(50), _guidance(7.5, sdxl=5.0), _seed(),
         *_size(_MODEL_SIZE + " or the control image's"),
         SCHEDULER, LORA, *_control(1.0), *SDXL_SIZES, *REFINE),
        images=(), optional_images=("control_image",), image_help=CONTROL_IMAGE, size_default=_MODEL_SIZE,
        reference=Reference("StableDiffusionPipeline", {"num_inference_steps": "steps",
                                                         "guidance_scale": "guidance", "height": "height",
                                                         "width": "width"},
                            sdxl_pipeline="StableDiffusionXLPipeline"), sdxl=True),
    Method(
        "sdedit", "ti2i.client.sdedit:sdedit", "SDEdit image-to-image", "image", "unet",
        (*_IMAGE_EDIT, "unet"), "sd",
        (PROMPT, NEGATIVE, _strength(0.8, sdxl=0.3), _steps(50), _guidance(7.5, sdxl=5.0), _seed(),
         *_size(_IMAGE_SIZE), SCHEDULER,
         LORA, *_control(0.8), *SDXL_SIZES),
        optional_images=("control_image",), image_help=CONTROL_IMAGE,
        reference=Reference("StableDiffusionImg2ImgPipeline", {"strength": "strength",
                                                                "num_inference_steps": "steps",
                                                                "guidance_scale": "guidance"},
                            sdxl_pipeline="StableDiffusionXLImg2ImgPipeline"), sdxl=True),
    Method(
        "inpaint", "ti2i.client.inpaint:inpaint",
        "inpainting with a 9-channel inpainting UNet (mask white = repaint)", "image", "unet_inpaint",
        # the masked image is edited in pixels, then encoded: the ensemble's two steps are called one by one
        ("encode_prompt", "image_preprocess", "vae_encoder", "decode_image", "unet_inpaint"), "inpaint",
        (Param("prompt", str, "", "what to paint into the masked region"), NEGATIVE,
         _strength(1.0, "1 starts from pure noise", sdxl=0.9999), _steps(50), _guidance(7.5), _seed(),
         *_size(_MODEL_SIZE + "; image and mask are resized to it"), SCHEDULER, LORA, *_control(0.5), *SDXL_SIZES),
        images=("image", "mask"), optional_images=("control_image",),
        image_help={"mask": "mask image file: white repaints, black keeps", **CONTROL_IMAGE},
        size_default=_MODEL_SIZE + "; image and mask are resized to it",
        reference=Reference("StableDiffusionInpaintPipeline", {"strength": "strength",
                                                                "num_inference_steps": "steps",
                                                                "guidance_scale": "guidance", "height": "height",
                                                                "width": "width"},
                            sdxl_pipeline="StableDiffusionXLInpaintPipeline"), sdxl=True),
    Method(
        "pix2pix", "ti2i.client.pix2pix:pix2pix", "InstructPix2Pix editing by instruction", "image", "unet_pix2pix",
        (*_IMAGE_EDIT, "unet_pix2pix"), "pix2pix",
        (Param("prompt", str, None, "the edit instruction (may be empty)", required=True), NEGATIVE, _steps(100),
         _guidance(7.5, "text guidance s_T", sdxl=5.0), Param("image_guidance", float, 1.5, "image guidance s_I"),
         _seed(),
         *_size(_IMAGE_SIZE), SCHEDULER, LORA, *SDXL_SIZES),
        reference=Reference("StableDiffusionInstructPix2PixPipeline",
                            {"num_inference_steps": "steps", "guidance_scale": "guidance",
                             "image_guidance_scale": "image_guidance"}, prompt_fn="_encode_prompt",
                            sdxl_pipeline="StableDiffusionXLInstructPix2PixPipeline"), sdxl=True),
    Method(
        "cyclediffusion", "ti2i.client.cyclediffusion:cyclediffusion",
        "CycleDiffusion editing from a source to a target prompt", "image", "unet", (*_IMAGE_EDIT, "unet"), "sd",
        (SOURCE, Param("prompt", str, None, "describes the edited image", required=True), _strength(0.8),
         _steps(50), _guidance(7.5), Param("source_guidance", float, 1.0, "guidance of the source chain"),
         Param("eta", float, 0.1, "DDIM eta, > 0", low=0.0, low_open=True), _seed(), *_size(_IMAGE_SIZE), LORA),
        reference=Reference("CycleDiffusionPipeline", {"source_prompt": "source_prompt", "strength": "strength",
                                                        "num_inference_steps": "steps", "guidance_scale": "guidance",
                                                        "source_guidance_scale": "source_guidance", "eta": "eta"},
                            scheduler="DDIMScheduler")),
    Method(
        "ddib", "ti2i.client.ddib:ddib",
        "DDIB: deterministic DDIM inversion under the source prompt, decoding under the target prompt", "image",
        "unet", (*_IMAGE_EDIT, "unet"), "sd",
        (SOURCE, Param("prompt", str, None, "describes the edited image", required=True),
         _strength(1.0, "how far up to invert (1: all the way)"), _steps(50),
         _guidance(1.0, "guidance of the decoding (target prompt)"),
         Param("source_guidance", float, 1.0, "guidance of the inversion (source prompt)"),
         *_size(_IMAGE_SIZE), LORA)),  # deterministic: no seed; diffusers has no DDIB pipeline
    Method(
        "svd", "ti2i.client.svd:svd", "Stable Video Diffusion image-to-video", "video", "unet_svd",
        ("image_encoder", "image_preprocess", "vae_encoder", "unet_svd", "vae_decoder_temporal", "image_postprocess"),
        "svd",
        (Param("frames", int, None, "frame count (default: the model's, 14 or 25)", low=1, high=64), _steps(25),
         Param("fps", int, 7, "frames per second (also a micro-condition)", low=1, high=60),
         Param("motion_bucket_id", int, 127, "how much motion (a micro-condition)", low=0, high=1023),
         Param("noise_aug", float, 0.02, "noise added to the conditioning image", low=0.0, high=1.0),
         Param("min_guidance", float, 1.0, "guidance of the first frame"),
         Param("max_guidance", float, 3.0, "guidance of the last frame"),
         Param("decode_chunk_size", int, None, "frames decoded at once (default: all)", low=1, high=64), _seed(),
         *_size("576×1024, the reference's")),
        size_default="576×1024, the reference's", out_help=_VIDEO_OUT, latent_layout="BFCHW",
        reference=Reference("StableVideoDiffusionPipeline",
                            {"num_frames": "frames", "num_inference_steps": "steps", "fps": "fps",
                             "motion_bucket_id": "motion_bucket_id", "noise_aug_strength": "noise_aug",
                             "min_guidance_scale": "min_guidance", "max_guidance_scale": "max_guidance",
                             "decode_chunk_size": "decode_chunk_size", "height": "height", "width": "width"},
                            prompt_fn=None, clip_fn="_encode_image", output="frames")),
    Method(
        "videoldm", "ti2i.client.videoldm:videoldm",
        "Video LDM image-to-video (SD 1.x + motion modules, merged with alpha)", "video", "unet_motion",
        (*_IMAGE_EDIT, "unet_motion"), "videoldm",
        (PROMPT, NEGATIVE, Param("frames", int, 16, "frame count", low=2), _strength(0.8), _steps(50),
         _guidance(7.5),
         Param("alpha", float, 0.0, "temporal merge: 1 = the image model per frame, 0 = the motion modules as "
                                    "trained", low=0.0, high=1.0),
         Param("anchor_first_frame", bool, True, "keep frame 0 on the input image's trajectory (default: on)"),
         Param("scheduler", str, MODEL_SCHEDULER, f"the sampling scheduler: {scheduler_help()}, or linear-ddim (the "
                                                  f"linear-beta DDIM the motion modules were trained with)"),
         Param("fps", float, 8.0, "frames per second of the written video", low=0.0, low_open=True), _seed(),
         *_size(_IMAGE_SIZE)),
        out_help=_VIDEO_OUT, latent_layout="BCFHW"),
)}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InvalidInputError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]
