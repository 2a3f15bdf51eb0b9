"""LoRA in the exported graphs: per-request adapter layers, and adapters fused into the weights.

Every exported UNet and text encoder takes per-sample adapters as inputs (`PerSampleLora`, `attach_lora_slots`;
`engines/adapters.py` packs what they read). `ti2i export --lora PATH[:SCALE]` instead fuses adapters: an adapter
in diffusers' LoRA format (what `save_lora_weights` writes; kohya/A1111 files through diffusers' converters) is
loaded into the UNet and the text encoder as `load_lora_weights` does, merged at its scale, and its layers
removed: the engines hold `W + scale · ΔW`. Several adapters add, as diffusers' `set_adapters` with one weight
each gives them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ti2i.errors import InvalidInputError

# The components an SD 1.x adapter reaches, by what they are (the text encoder or a 2-D conditional UNet).
TEXT_ENCODERS = frozenset({"text_encoder"})
UNETS = frozenset({"unet", "unet_pix2pix", "unet_inpaint"})


@dataclass(frozen=True)
class Lora:
    path: str
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_lora(text: str) -> Lora:
    """``PATH`` or ``PATH:SCALE`` (a file or a folder holding one)."""
    path, sep, scale = text.rpartition(":")
    if not sep or Path(text).exists():
        path, scale = text, "1"
    try:
        value = float(scale)
    except ValueError:
        raise InvalidInputError(f"--lora {text!r}: the scale after ':' must be a number") from None
    if not Path(path).exists():
        raise InvalidInputError(f"--lora {text!r}: {path} does not exist (a LoRA .safetensors file or its folder)")
    return Lora(path, value)


def fuse_loras(module: torch.nn.Module, component: str, loras: tuple[Lora, ...]) -> torch.nn.Module:
    """`module` (the component `component`) with each adapter's update merged in at its scale."""
    if not loras or (component not in UNETS and component not in TEXT_ENCODERS):
        return module
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import recurse_remove_peft_layers

    for index, lora in enumerate(loras):
        name = f"ti2i_lora_{index}"
        try:
            state, alphas = StableDiffusionPipeline.lora_state_dict(lora.path)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise InvalidInputError(f"--lora {lora.path}: not a LoRA file diffusers reads ({err})") from None
        try:
            if component in UNETS:
                StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=module, adapter_name=name)
            else:
                StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=module,
                                                                    adapter_name=name)
        except (RuntimeError, ValueError, KeyError) as err:  # a size mismatch: an adapter of another model
            raise InvalidInputError(f"--lora {lora.path} does not fit this model's {component} (an adapter of "
                                    f"another base model?): {str(err).splitlines()[0][:300]}") from None
        _merge(module, lora.scale)
        recurse_remove_peft_layers(module)  # the merged weights stay; the adapter's layers go
        if "peft_config" in vars(module):
            del module.peft_config
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False
    return module


def _merge(module: torch.nn.Module, scale: float) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            if scale != 1.0:
                layer.scale_layer(scale)
            layer.merge()


# --- per-request adapters: the graph side (engines/adapters.py packs what these layers read) -----------

class LoraSlots:
    """The current call's packed adapter inputs, read by every `PerSampleLora` layer of one module."""

    down: torch.Tensor  # [batch, Σ in, rank]
    up: torch.Tensor  # [batch, rank, Σ out]


class PerSampleLora(torch.nn.Module):
    """A linear layer or 1×1 convolution plus each sample's low-rank update, read from its rows of the slots."""

    def __init__(self, base: torch.nn.Module, slots: LoraSlots, rows: tuple[int, int], cols: tuple[int, int]):
        super().__init__()
        self.base = base
        self.slots = slots
        self.rows, self.cols = rows, cols
        self.conv = isinstance(base, torch.nn.Conv2d)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        down = self.slots.down[:, self.rows[0]:self.rows[1]]  # [batch, in, rank]
        up = self.slots.up[:, :, self.cols[0]:self.cols[1]]  # [batch, rank, out]
        tokens = x.flatten(2).transpose(1, 2) if self.conv else x.reshape(x.shape[0], -1, x.shape[-1])
        update = torch.bmm(torch.bmm(tokens.to(down.dtype), down), up).to(out.dtype)
        if self.conv:
            return out + update.transpose(1, 2).reshape(out.shape)
        return out + update.reshape(out.shape)


def attach_lora_slots(module: torch.nn.Module) -> LoraSlots:
    """Put a `PerSampleLora` in place of every layer `lora_layers` names; the returned slots feed them all."""
    from ti2i.engines.adapters import layer_features, lora_layers

    for layer in module.modules():  # wrapped already (one module, two wrappers: the UNet with and without a
        if isinstance(layer, PerSampleLora):  # ControlNet's residuals): the same slots feed both
            return layer.slots
    slots = LoraSlots()
    row = col = 0
    for name, layer in lora_layers(module):
        features_in, features_out = layer_features(layer)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, PerSampleLora(layer, slots, (row, row + features_in), (col, col + features_out)))
        row += features_in
        col += features_out
    return slots
