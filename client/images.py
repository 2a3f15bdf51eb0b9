"""Reading user images: one clear error per problem, colour modes converted, sizes snapped like diffusers."""

from __future__ import annotations

import io
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


def _check_size(width: int, height: int, limit: int, what: str = "image") -> None:
    if width == 0 or height == 0:
        raise InvalidInputError(f"{what} has zero size ({width}×{height})")
    if width * height > limit:
        raise InvalidInputError(f"{what} of {width}×{height} = {width * height} pixels is over the limit of "
                                f"{limit} pixels (set {MAX_PIXELS_ENV} or max_pixels to change it)")


def load_image(source: str | Path | bytes | Image.Image, max_pixels: int | None = None, what: str = "image",
               convert_rgb: bool = True) -> Image.Image:
    """An RGB PIL image from a path, a file's bytes or an image; RGBA, grayscale and palette images are converted.

    A file's size is checked from its header, before its pixels are decoded. `what` names the input in
    error messages; with ``convert_rgb=False`` the image keeps its mode (an inpainting mask is resized
    in its own mode and then made grayscale, as the reference does).
    """
    limit = pixel_limit(max_pixels)
    if isinstance(source, Image.Image):
        image = source
        _check_size(*image.size, limit, what)
    elif isinstance(source, bytes):
        image = _decode(io.BytesIO(source), f"{what} ({len(source)} bytes)", limit, what)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"{what} file {path} does not exist")
        image = _decode(path, f"{what} {path}", limit, what)
    else:
        raise InvalidInputError(f"{what} must be an image file path, its bytes or a PIL image, "
                                f"got {type(source).__name__}")
    image = _eight_bit(image)
    if not convert_rgb:
        return image
    if image.mode != "RGB":
        image = image.convert("RGBA").convert("RGB") if image.mode == "P" else image.convert("RGB")
    return image


# Pillow's wide single-channel modes: 16-bit grayscale PNGs open as I;16 (or I), whose values Pillow's own
# conversion to RGB clips at 255, making a full-range image all white. Their 8-bit equivalent is value/257.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit grayscale with the same tones; other modes as they are."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image, dtype=np.float64)
    return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), mode="L")


def _decode(file: Path | io.BytesIO, label: str, limit: int, what: str) -> Image.Image:
    """Open, check the size from the header, then decode."""
    try:
        with Image.open(file) as opened:
            _check_size(*opened.size, limit, what)
            opened.load()
            return opened.copy()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, InvalidInputError):
            raise
        reason = "not a format Pillow reads" if isinstance(err, UnidentifiedImageError) else str(err)
        raise InvalidInputError(f"{label} is not a readable image: {reason}") from None


def snap_size(image: Image.Image, height: int | None, width: int | None, multiple: int) -> tuple[int, int]:
    """Height and width rounded down to a multiple of the VAE factor, as diffusers' VaeImageProcessor does."""
    return _snap(height, width, image.height, image.width, multiple)


def _snap(height: int | None, width: int | None, default_height: int, default_width: int,
          multiple: int) -> tuple[int, int]:
    for label, value in (("height", height), ("width", width)):
        if value is not None and value <= 0:
            raise InvalidInputError(f"{label} must be positive, got {value}")
    asked_h = height if height is not None else default_height
    asked_w = width if width is not None else default_width
    h, w = asked_h - asked_h % multiple, asked_w - asked_w % multiple
    if h == 0 or w == 0:
        raise InvalidInputError(f"size {asked_w}×{asked_h} is smaller than one latent pixel ({multiple}×{multiple}): "
                                f"give an image or --height/--width of at least {multiple}")
    return h, w


def requested_size(height: int | None, width: int | None, default: int, multiple: int,
                   max_pixels: int | None = None) -> tuple[int, int]:
    """An output size not taken from an input image: given or the model's default, snapped, within the limit."""
    h, w = _snap(height, width, default, default, multiple)
    limit = pixel_limit(max_pixels)
    if h * w > limit:
        raise InvalidInputError(f"requested size {w}×{h} is over the limit of {limit} pixels")
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


def prepare_mask(mask: Image.Image, height: int, width: int, multiple: int) -> np.ndarray:
    """float32 [1, 1, H, W] in {0, 1} (1 = repaint): resized to the output size in the mask's own mode,
    made grayscale and binarised at 0.5, exactly as the inpainting pipeline's mask processor does."""
    from diffusers.image_processor import VaeImageProcessor

    processor = VaeImageProcessor(vae_scale_factor=multiple, do_normalize=False, do_binarize=True,
                                  do_convert_grayscale=True)
    try:
        return processor.preprocess(mask, height=height, width=width).numpy().astype(np.float32)
    except (ValueError, OSError, TypeError) as err:
        raise InvalidInputError(f"mask of mode {mask.mode} cannot be made a grayscale mask: {err}") from None


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [H, W, 3] -> PIL image."""
    return Image.fromarray(image)


def centered_ellipse_mask(size: tuple[int, int]) -> Image.Image:
    """An inpainting mask: a white (repaint) ellipse in the middle of black (keep), the example's mask."""
    from PIL import ImageDraw

    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return mask


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two [0, 1] float images or videos (inf where they are equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
