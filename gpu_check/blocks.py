"""A small SD-like denoiser block stack in plain torch, for GPU checks on machines without diffusers.

Conv, GroupNorm + SiLU, self- and cross-attention, a down- and an up-sampling: the op mix of an SD
UNet at a few million parameters. Its figures are not comparable to the anchors (see EXPECTED.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ti2i.spec import BATCH, ComponentSpec, TensorSpec


class Block(nn.Module):
    def __init__(self, channels: int, context: int, heads: int = 4):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(channels, heads, kdim=context, vdim=context, batch_first=True)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(nn.functional.silu(self.norm(x)))
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        tokens = tokens + self.self_attn(tokens, tokens, tokens, need_weights=False)[0]
        tokens = tokens + self.cross_attn(tokens, context, context, need_weights=False)[0]
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class TinyDenoiser(nn.Module):
    """(sample, timestep, encoder_hidden_states) -> noise_pred, like the exported UNets."""

    def __init__(self, channels: int = 64, latent: int = 4, context: int = 64):
        super().__init__()
        self.inp = nn.Conv2d(latent, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)
        self.down = Block(channels, context)
        self.pool = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.mid = Block(channels, context)
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.out = nn.Conv2d(2 * channels, latent, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        t = self.time((timestep.float() / 1000.0)[:, None]).to(sample.dtype)[:, :, None, None]
        x = self.inp(sample) + t
        skip = self.down(x, encoder_hidden_states)
        x = self.up(self.mid(self.pool(skip), encoder_hidden_states))
        return self.out(torch.cat([x, skip], dim=1))


def denoiser_spec(dtype: str = "float32", side: int = 64) -> ComponentSpec:
    return ComponentSpec(
        name="unet",
        inputs=(TensorSpec("sample", dtype, (BATCH, 4, "height", "width")),
                TensorSpec("timestep", "float32", (BATCH,), (0.0, 1000.0)),
                TensorSpec("encoder_hidden_states", dtype, (BATCH, 77, 64))),
        outputs=(TensorSpec("noise_pred", dtype, (BATCH, 4, "height", "width")),),
        dims={BATCH: (1, 8), "height": (side, side), "width": (side, side)},
        opt={BATCH: 2, "height": side, "width": side},
    )
