"""What a method returns: the output and how long each stage took."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ti2i.client.timing import Timings


@dataclass
class ImageResult:
    image: Image.Image
    array: np.ndarray  # float32 [H, W, 3] in [0, 1], before rounding to uint8
    timings: Timings = field(default_factory=Timings)
    latents: torch.Tensor | None = None  # the final latents, before decoding


@dataclass
class VideoResult:
    frames: np.ndarray  # uint8 [F, H, W, 3]
    array: np.ndarray  # float32 [F, H, W, 3] in [0, 1], before rounding to uint8
    fps: float
    timings: Timings = field(default_factory=Timings)
    latents: torch.Tensor | None = None  # the final latents, before decoding
