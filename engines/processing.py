"""Pre- and post-processing steps, declared and run like components.

They sit between the user's data (text, uint8 images) and the networks, so that the Triton ensembles
and the in-process runner chain exactly the same functions. Each step's spec is derived from the
pipeline facts in the manifest; each runs on numpy only (and a tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines.base import Engine
from ti2i.errors import InvalidInputError
from ti2i.spec import BATCH, ComponentSpec, TensorSpec

# Pixel-size range of images the pre/post steps (and the VAE) accept; the clients enforce a pixel limit too.
IMAGE_SIDE_RANGE = (8, 2048)
MAX_BATCH = 16
FRAMES_MAX_BATCH = 64  # the image steps also carry every frame of a decoded video chunk


def image_dims(scale: int) -> dict[str, tuple[int, int]]:
    """Ranges of the pixel dims and the latent dims they map to (latent = pixel / scale)."""
    low, high = IMAGE_SIDE_RANGE
    return {
        BATCH: (1, MAX_BATCH),
        "image_height": (low, high),
        "image_width": (low, high),
        "height": (max(1, low // scale), high // scale),
        "width": (max(1, low // scale), high // scale),
    }


@dataclass(frozen=True)
class ProcessingStep:
    name: str
    spec: Callable[[Mapping[str, Any]], ComponentSpec]
    make: Callable[[Mapping[str, Any], Path], Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]]
    applies: Callable[[Mapping[str, Any]], bool] = lambda pipeline: True  # does the pipeline need this step?


# --- tokenize: text -> token ids (SDXL: tokenize_2 too, for its second text encoder) ------------------

def _tokenize_step(name: str, folder: str, ids: str) -> ProcessingStep:
    """Text -> `ids`, with the tokenizer saved in the engine directory's `pipeline[folder]` (when it has one)."""
    def spec(pipeline: Mapping[str, Any]) -> ComponentSpec:
        return ComponentSpec(
            name=name,
            inputs=(TensorSpec("text", "object", (BATCH,)),),
            outputs=(TensorSpec(ids, "int32", (BATCH, pipeline["max_length"])),),
            dims={BATCH: (1, MAX_BATCH)},
        )

    def make(pipeline: Mapping[str, Any], root: Path):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(root / pipeline[folder]))
        max_length = pipeline["max_length"]

        def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            texts = [_as_text(t) for t in inputs["text"].reshape(-1)]
            tokens = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True,
                               return_tensors="np").input_ids
            return {ids: tokens.astype(np.int32)}

        return run

    return ProcessingStep(name, spec, make, lambda pipeline: folder in pipeline)


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInputError(f"tokenize.text: not valid UTF-8 ({err})") from None
    return str(value)


# --- image_preprocess: uint8 HWC -> float CHW in [-1, 1] --------------------------------------------

def _preprocess_spec(pipeline: Mapping[str, Any]) -> ComponentSpec:
    return ComponentSpec(
        name="image_preprocess",
        inputs=(TensorSpec("image", "uint8", (BATCH, "image_height", "image_width", 3), (0, 256)),),
        outputs=(TensorSpec("images", "float32", (BATCH, 3, "image_height", "image_width")),),
        dims={**image_dims(pipeline["vae_scale_factor"]), BATCH: (1, FRAMES_MAX_BATCH)},
    )


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [-1, 1], as diffusers' VaeImageProcessor does."""
    x = image.astype(np.float32) / 255.0
    return np.ascontiguousarray((2.0 * x - 1.0).transpose(0, 3, 1, 2))


def _make_preprocess(pipeline: Mapping[str, Any], root: Path):
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"images": to_model_range(inputs["image"])}

    return run


# --- image_postprocess: float CHW in [-1, 1] -> uint8 HWC (and the [0, 1] float image) ----------------

def _postprocess_spec(pipeline: Mapping[str, Any]) -> ComponentSpec:
    return ComponentSpec(
        name="image_postprocess",
        inputs=(TensorSpec("images", "float32", (BATCH, 3, "image_height", "image_width")),),
        outputs=(
            TensorSpec("image", "uint8", (BATCH, "image_height", "image_width", 3)),
            TensorSpec("image_float", "float32", (BATCH, "image_height", "image_width", 3)),
        ),
        dims={**image_dims(pipeline["vae_scale_factor"]), BATCH: (1, FRAMES_MAX_BATCH)},
    )


def to_unit_range(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [B, 3, H, W] in [-1, 1] -> (uint8 [B, H, W, 3], float32 [B, H, W, 3] in [0, 1]), as diffusers."""
    unit = np.clip(images / 2.0 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    return (unit * 255.0).round().astype(np.uint8), unit


def _make_postprocess(pipeline: Mapping[str, Any], root: Path):
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        image, unit = to_unit_range(inputs["images"])
        return {"image": image, "image_float": unit}

    return run


STEPS: dict[str, ProcessingStep] = {
    step.name: step
    for step in (
        _tokenize_step("tokenize", "tokenizer", "input_ids"),
        _tokenize_step("tokenize_2", "tokenizer_2", "input_ids_2"),
        ProcessingStep("image_preprocess", _preprocess_spec, _make_preprocess),
        ProcessingStep("image_postprocess", _postprocess_spec, _make_postprocess),
    )
}


class ProcessingEngine(Engine):
    """A processing step behind the engine interface."""

    def __init__(self, step: ProcessingStep, spec: ComponentSpec, pipeline: Mapping[str, Any], root: Path):
        super().__init__(spec)
        self._fn = step.make(pipeline, root)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._fn(inputs)
