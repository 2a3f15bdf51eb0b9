"""A request's ControlNet: the control image and the residuals it adds to each UNet call, as diffusers'
`StableDiffusionControlNet*Pipeline`s compute them.

The control image is the user's own (a canny edge map, a depth map, a pose: whatever the ControlNet was
trained on); it is resized like the pipelines' control image processor does and scaled to [0, 1], nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ti2i.client.images import load_image, prepare_image
from ti2i.client.registry import CONTROLLED_UNETS, CONTROLNET_PREFIX
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.runner import Runner


@dataclass(frozen=True)
class Control:
    """The served ControlNet, its image ([uncond, cond] rows with guidance), scale and active fraction."""

    model: str
    image: torch.Tensor
    scale: float
    start: float
    end: float

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the control image once resized: the output's."""
        return int(self.image.shape[2]), int(self.image.shape[3])

    def check_size(self, height: int, width: int) -> None:
        if self.size != (height, width):
            raise InvalidInputError(f"the control image is {self.size[1]}×{self.size[0]} once resized, the output "
                                    f"{width}×{height}: give images of the same size, or --height and --width")

    def keep(self, step: int, steps: int) -> float:
        """1 while step `step` of `steps` lies in [start, end] of the schedule, else 0 (the pipelines' keep)."""
        return 1.0 - float(step / steps < self.start or (step + 1) / steps > self.end)

    def residuals(self, runner: Runner, sample: torch.Tensor, timestep: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, step: int, steps: int, **conditions: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """The ControlNet's residuals for this UNet input (and its `conditions`: SDXL's text-time inputs), times
        the step's conditioning scale."""
        scale = self.scale * self.keep(step, steps)
        out = runner.run_tensors(self.model, sample=sample, timestep=timestep,
                                 encoder_hidden_states=encoder_hidden_states, controlnet_cond=self.image,
                                 **conditions)
        return {name: value * scale for name, value in out.items()}


def prepare_control(runner: Runner, image: str | Path | bytes | Image.Image | None, controlnet: str | None,
                    scale: float, start: float, end: float, height: int | None, width: int | None, rows: int,
                    max_pixels: int | None = None) -> Control | None:
    """The request's `Control` (None without a control image): the image resized as the pipelines' control
    image processor does (to `height` × `width`; a size left out is the image's own, snapped to the VAE
    factor), in [0, 1], repeated for `rows` (the guidance batch)."""
    if image is None:
        if controlnet is not None:
            raise InvalidInputError(f"ControlNet {controlnet!r} needs a control image (--control-image)")
        return None
    model = CONTROLNET_PREFIX + _choose(runner.pipeline.get("controlnets", []), controlnet)
    if not 0.0 <= start < end <= 1.0:
        raise InvalidInputError(f"control start and end must satisfy 0 ≤ start < end ≤ 1, got {start} and {end}")
    pil = load_image(image, max_pixels, what="control image")
    pixels = prepare_image(pil, height, width, runner.pipeline["vae_scale_factor"], max_pixels)
    tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    return Control(model, tensor.repeat(rows, 1, 1, 1).to(runner.device), scale, start, end)


def _choose(available: list[str], name: str | None) -> str:
    if not available:
        raise ModelNotFoundError("these engines have no ControlNet: export one with `ti2i export --model M "
                                 "--controlnet DIR`")
    if name is None:
        if len(available) > 1:
            raise InvalidInputError(f"several ControlNets are served ({', '.join(available)}): choose one with "
                                    f"--controlnet")
        return available[0]
    if name not in available:
        raise InvalidInputError(f"unknown ControlNet {name!r}: these engines have {', '.join(available)}")
    return name


def controlled(unet: str, control: Control | None) -> str:
    """The UNet a loop calls: `unet`, or its twin that takes a ControlNet's residuals."""
    return unet if control is None else CONTROLLED_UNETS[unet]

