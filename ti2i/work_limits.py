"""Operator-set ceilings on the work one request may ask for: denoising steps and output pixels.

The record's ranges (`Param.check`) keep each value sane on its own; these ceilings bound the cost of a
request the server accepts, checked right after the request is read and before it waits for a place.
In-process calls have none: the caller pays for its own work.

What is counted: `steps` as asked (the schedule's length; an img2img method runs steps × strength of
it), and frames × height × width of the output. A value left out of the call is the record's default;
where the record leaves it to the input image (the image-editing methods' size) it is read from the
image's header in the call, and where it leaves it to the model (txt2img's and inpaint's size, svd's
frames and size) it counts as the largest default among the models served (`MODEL_DEFAULTS`), so a
request never counts less than it costs. An image whose header cannot be read is not counted here: the
method refuses it before any step.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ti2i.client.registry import Method, get_method
from ti2i.errors import InvalidInputError

# Frames, height and width the model decides when a call leaves them out, at their largest: SVD-XT's
# 25 frames of 576×1024, SDXL's 1024² images (SD 1.5's 512² and SVD's 14 frames count high, never low).
MODEL_DEFAULTS: dict[str, dict[str, int]] = {"svd": {"frames": 25, "height": 576, "width": 1024},
                                             "": {"height": 1024, "width": 1024}}


@dataclass(frozen=True)
class WorkLimits:
    """The most one request may ask for. The pixel default, 2**24 (16.8 M), lets the methods' ordinary
    outputs through (SVD-XT's 25 × 576×1024 = 14.7 M, an SDXL 1024² image, Video LDM's 32 × 512²) and
    refuses, say, 64 frames of 576×1024; the step default, 1000, is the training timesteps of every model
    served (no schedule of theirs can take more)."""

    max_steps: int = 1000
    max_pixels: int = 2**24

    def __post_init__(self) -> None:
        for flag, value in (("--max-steps", self.max_steps), ("--max-pixels", self.max_pixels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{flag} must be a positive integer, got {value!r}")

    def check(self, method_name: str, call: Mapping[str, Any]) -> None:
        """Refuse (InvalidInputError) a call of `method_name` that asks for more steps or output pixels than
        these limits allow; `call` is the method's keywords, images included (`read_request`'s)."""
        method = get_method(method_name)
        values = {**method.defaults(), **method.check({k: v for k, v in call.items() if v is not None})}
        steps = values.get("steps")
        if steps is not None and steps > self.max_steps:
            raise InvalidInputError(f"{method.name}: steps {steps} is over this server's limit of "
                                    f"{self.max_steps} (--max-steps)")
        size = output_size(method, values)
        if size is None:
            return
        (frames, height, width), counted = size
        pixels = frames * height * width
        if pixels > self.max_pixels:
            shape = f"frames × height × width = {frames} × {height} × {width}" if "frames" in values else \
                f"height × width = {height} × {width}"
            note = "".join(f"; {c}" for c in counted)
            raise InvalidInputError(f"{method.name}: {shape} = {pixels} output pixels is over this server's limit "
                                    f"of {self.max_pixels} (--max-pixels){note}")


def output_size(method: Method, values: Mapping[str, Any]) -> tuple[tuple[int, int, int], list[str]] | None:
    """((frames, height, width), how the values left out were counted) of a call's output, its parameters
    completed with the record's defaults; None when the size is the input image's and it cannot be read."""
    model = MODEL_DEFAULTS.get(method.name, MODEL_DEFAULTS[""])
    counted: list[str] = []
    frames = values.get("frames", 1)
    if frames is None:
        frames = model["frames"]
        counted.append(f"frames left to the model, counted as {frames}")
    height, width = values.get("height"), values.get("width")
    if height is None or width is None:
        if method.size_from_image:
            image = _image_size(values.get(method.images[0]) if method.images else None)
            if image is None:
                return None
            default = {"width": image[0], "height": image[1]}
            how = "{name} {value}: the input image's"
        else:
            default = {"height": model["height"], "width": model["width"]}
            how = "{name} left to the model, counted as {value}"
        counted += [how.format(name=name, value=default[name])
                    for name, value in (("height", height), ("width", width)) if value is None]
        height = default["height"] if height is None else height
        width = default["width"] if width is None else width
    return (frames, height, width), counted


def _image_size(source: Any) -> tuple[int, int] | None:
    """(width, height) from an image's header (a file's bytes, its path or a PIL image); None if unreadable."""
    from PIL import Image

    if source is None:
        return None
    if isinstance(source, Image.Image):
        return source.size
    if not isinstance(source, (bytes, str, os.PathLike)):
        return None
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
