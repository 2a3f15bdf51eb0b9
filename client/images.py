"""Reading user images: one clear error per problem, colour modes converted, sizes snapped like diffusers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ti2i.errors import InvalidInputError

DEFAULT_MAX_PIXELS = int(os.environ.get("TI2I_MAX_PIXELS", 2048 * 2048))


def load_image(source: str | Path | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB PIL image from a path or an image; RGBA, grayscale and palette images are converted."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"image file {path} does not exist")
        try:
            with Image.open(path) as opened:
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise InvalidInputError(f"{path} is not a readable image: {err}") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise InvalidInputError(f"image has zero size ({width}×{height})")
    if width * height > max_pixels:
        raise InvalidInputError(f"image of {width}×{height} = {width * height} pixels is over the limit of "
                                f"{max_pixels} pixels (set TI2I_MAX_PIXELS or max_pixels to change it)")
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return image


def snap_size(image: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """Height and width rounded down to a multiple of the VAE factor, as diffusers' VaeImageProcessor does."""
    for label, value in (("height", height), ("width", width)):
        if value is not None and value <= 0:
            raise InvalidInputError(f"{label} must be positive, got {value}")
    h = height if height is not None else image.height
    w = width if width is not None else image.width
    h, w = h - h % multiple, w - w % multiple
    if h == 0 or w == 0:
        raise InvalidInputError(f"image size {w}×{h} is smaller than one latent pixel ({multiple}×{multiple})")
    return h, w


def prepare_image(image: Image.Image, height: int | None, width: int | None, multiple: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """uint8 [1, H, W, 3], resized with Lanczos to the snapped size exactly as the reference pipelines do."""
    from diffusers.image_processor import VaeImageProcessor

    h, w = snap_size(image, height, width, multiple)
    if h * w > max_pixels:
        raise InvalidInputError(f"requested size {w}×{h} is over the limit of {max_pixels} pixels")
    resized = VaeImageProcessor(vae_scale_factor=multiple).resize(image, h, w)
    return np.asarray(resized, dtype=np.uint8)[None]


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, 3] -> PIL image."""
    return Image.fromarray(image)
