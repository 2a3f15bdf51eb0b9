"""Reading user images: one clear error per problem, colour modes converted, sizes snapped like diffusers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ti2i.errors import InvalidInputError

DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_PIXELS_ENV = "TI2I_MAX_PIXELS"


def pixel_limit(max_pixels: int | None = None) -> int:
    """The pixel limit: the argument, else $TI2I_MAX_PIXELS (read at each call), else 2048²."""
    if max_pixels is not None:
        return max_pixels
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidInputError(f"{MAX_PIXELS_ENV}={raw!r} is not a positive integer")
    return value


def _check_size(width: int, height: int, limit: int) -> None:
    if width == 0 or height == 0:
        raise InvalidInputError(f"image has zero size ({width}×{height})")
    if width * height > limit:
        raise InvalidInputError(f"image of {width}×{height} = {width * height} pixels is over the limit of "
                                f"{limit} pixels (set {MAX_PIXELS_ENV} or max_pixels to change it)")


def load_image(source: str | Path | Image.Image, max_pixels: int | None = None) -> Image.Image:
    """An RGB PIL image from a path or an image; RGBA, grayscale and palette images are converted.

    A file's size is checked from its header, before its pixels are decoded.
    """
    limit = pixel_limit(max_pixels)
    if isinstance(source, Image.Image):
        image = source
        _check_size(*image.size, limit)
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"image file {path} does not exist")
        try:
            with Image.open(path) as opened:
                _check_size(*opened.size, limit)
                opened.load()
                image = opened.copy()
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            if isinstance(err, InvalidInputError):
                raise
            raise InvalidInputError(f"{path} is not a readable image: {err}") from None
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
                  max_pixels: int | None = None) -> np.ndarray:
    """uint8 [1, H, W, 3], resized with Lanczos to the snapped size exactly as the reference pipelines do."""
    from diffusers.image_processor import VaeImageProcessor

    h, w = snap_size(image, height, width, multiple)
    limit = pixel_limit(max_pixels)
    if h * w > limit:
        raise InvalidInputError(f"requested size {w}×{h} is over the limit of {limit} pixels")
    resized = VaeImageProcessor(vae_scale_factor=multiple).resize(image, h, w)
    return np.asarray(resized, dtype=np.uint8)[None]


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, 3] -> PIL image."""
    return Image.fromarray(image)
