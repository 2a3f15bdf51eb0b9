"""What a served method model reads and writes: tensors named as the CLI's flags, encoded files.

Inputs: the image (and mask) as a file's bytes (PNG, JPEG, WebP, ...) or that file's base64 text, told
apart by the image formats' magic numbers; prompts as UTF-8 BYTES; each parameter of the method's
record as an optional one-element tensor (left out: the record's default); `format` (png for images,
mp4 or gif for videos). Outputs: `encoded` (the file), `encoded_base64` (its base64 text, for JSON
clients) and `pixels` (uint8 [H, W, 3] or [F, H, W, 3]). Decoding and validation errors are
`InvalidInputError`s naming the tensor; each parameter's kind and range are checked here by its record,
before the request waits (the method function checks what needs the model).
"""

from __future__ import annotations

import base64
import binascii
import io
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.client.registry import Method, Param
from ti2i.errors import InvalidInputError

# Leading bytes of the image files we accept (PNG, JPEG, WebP ("RIFF....WEBP"), GIF, BMP, TIFF).
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
FORMATS = {"image": ("png",), "video": ("mp4", "gif")}
OUTPUTS = ("encoded", "encoded_base64", "pixels")
STREAM_OUTPUTS = ("stage", "step", "steps", "elapsed", "preview")

# A fixed linear map from the 4 SD 1.x latent channels to RGB for previews (no VAE call): the widely used
# SD 1.5 approximation of ComfyUI (comfy/latent_formats.py, SD15.latent_rgb_factors), rows = channels.
LATENT_RGB = np.array([[0.3512, 0.2297, 0.3227],
                       [0.3250, 0.4974, 0.2350],
                       [-0.2829, 0.1762, 0.2721],
                       [-0.2120, -0.2616, -0.7177]], dtype=np.float32)


def image_bytes(value: Any, name: str) -> bytes:
    """The image file's bytes from a BYTES element: the file itself, or its base64 text (wrapped in lines or
    not, bare or as a ``data:`` URL)."""
    data = value if isinstance(value, bytes) else str(value).encode()
    if data.startswith(MAGIC):
        return data
    text = data.strip()
    if text.startswith(b"data:") and b";base64," in text[:100]:
        text = text.split(b";base64,", 1)[1]
    try:
        decoded = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if decoded.startswith(MAGIC):
        return decoded
    raise InvalidInputError(f"input {name!r} is neither an image file (PNG, JPEG, WebP, ...) nor one's base64 "
                            f"text ({len(data)} bytes starting {data[:8]!r})")


def one_value(array: np.ndarray | None, name: str) -> Any:
    """The single element of a parameter tensor (None when the tensor was left out)."""
    if array is None:
        return None
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise InvalidInputError(f"input {name!r} takes one value, got shape {list(np.shape(array))}")
    return flat[0]


def text(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"input {name!r} is not UTF-8 text") from None
    return str(value)


def param_value(param: Param, value: Any) -> Any:
    """A parameter tensor's element as a checked Python value (the record's kind and range, `Param.check`)."""
    if value is None:
        return None
    return param.check(text(value, param.name) if param.kind is str else value)


def read_request(method: Method, get: Callable[[str], np.ndarray | None]) -> tuple[dict[str, Any], str]:
    """(the method call's keywords, the output format) from a request's tensors, fetched by `get(name)`."""
    call: dict[str, Any] = {}
    for name in method.images:
        value = one_value(get(name), name)
        if value is None:
            raise InvalidInputError(f"missing input {name!r} (the {name} file's bytes or base64 text)")
        call[name] = image_bytes(value, name)
    for name in method.optional_images:
        value = one_value(get(name), name)
        if value is not None:
            call[name] = image_bytes(value, name)
    for param in method.params:
        if param.many:
            values = get(param.name)
            if values is not None:
                call[param.name] = param.check([text(v, param.name) for v in np.asarray(values).reshape(-1)])
            continue
        value = param_value(param, one_value(get(param.name), param.name))
        if value is None and param.required:
            raise InvalidInputError(f"missing input {param.name!r} ({param.help})")
        if value is not None:
            call[param.name] = value
    fmt = one_value(get("format"), "format")
    fmt = FORMATS[method.output][0] if fmt is None else text(fmt, "format").lower()
    if fmt not in FORMATS[method.output]:
        raise InvalidInputError(f"format {fmt!r} is not one of {', '.join(FORMATS[method.output])} "
                                f"(for {method.name}'s {method.output})")
    return call, fmt


def pixels_of(result: Any) -> np.ndarray:
    """uint8 [H, W, 3] of an image result, [F, H, W, 3] of a video result."""
    return np.asarray(result.frames if hasattr(result, "frames") else result.image, dtype=np.uint8)


def encode(result: Any, fmt: str) -> bytes:
    """The result as a PNG, MP4 or GIF file's bytes."""
    if fmt == "png":
        buffer = io.BytesIO()
        result.image.save(buffer, format="PNG")
        return buffer.getvalue()
    from ti2i.client.video import write_video

    with tempfile.TemporaryDirectory(prefix="ti2i-video-") as tmp:
        path = Path(tmp) / f"video.{fmt}"
        write_video(result.frames, path, result.fps)
        return path.read_bytes()


def result_outputs(result: Any, fmt: str, wanted: Iterable[str]) -> dict[str, np.ndarray]:
    """The named outputs (only those asked for: encoding a video is not free)."""
    wanted = list(wanted)
    out: dict[str, np.ndarray] = {}
    if "encoded" in wanted or "encoded_base64" in wanted:
        data = encode(result, fmt)
        if "encoded" in wanted:
            out["encoded"] = np.array([data], dtype=object)
        if "encoded_base64" in wanted:
            out["encoded_base64"] = np.array([base64.b64encode(data)], dtype=object)
    if "pixels" in wanted:
        out["pixels"] = np.ascontiguousarray(pixels_of(result))
    return out


def preview(sample: np.ndarray, layout: str) -> np.ndarray:
    """uint8 [h, w, 3] of the first sample's (and first frame's) latent, by the fixed projection."""
    if layout == "BFCHW":
        latent = sample[0, 0, :4]
    elif layout == "BCFHW":
        latent = sample[0, :4, 0]
    else:
        latent = sample[0, :4]
    rgb = np.einsum("chw,cr->hwr", latent.astype(np.float32), LATENT_RGB)
    return np.clip((rgb + 1.0) * 127.5, 0, 255).astype(np.uint8)
