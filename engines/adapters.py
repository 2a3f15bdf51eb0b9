"""LoRA adapters chosen per request: each sample of a batched call carries its own low-rank update.

The exported UNets and text encoder take two more inputs (`export/lora.py` builds the graph side), the
adapters of every sample packed over the targeted layers (those of the attention blocks: `lora_layers`):

- ``lora_down`` [batch, Σ in_features, rank]: each layer's A (``lora_A.weight``ᵀ), rows one layer after another;
- ``lora_up`` [batch, rank, Σ out_features]: each layer's B (``lora_B.weight``ᵀ) times its scale.

A layer's output gains ``(x · down[layer]) · up[layer]`` per sample, as peft's LoRA layer adds
``scaling · B(A(x))``. Several adapters on one sample stand side by side along the rank (their updates
add, as diffusers' `set_adapters` with one weight each); a sample without any has rank-1 zeros, and
calls of different ranks merge by zero padding (exact: a zero rank adds nothing). So requests with
different adapters, scales or none share one engine call, as Punica and S-LoRA batch LLM adapters.

An adapter file is read as diffusers reads it (`lora_state_dict`: diffusers' and peft's formats, kohya's
through diffusers' converters) and loaded by peft into a weightless copy of the component (`skeleton`),
so the ranks, alphas and per-layer patterns are exactly what `load_lora_weights` makes of them.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.errors import InvalidInputError

LORA_DOWN, LORA_UP, LORA_RANK = "lora_down", "lora_up", "lora_rank"
# The axis that holds the rank in each adapter input: calls merge by zero padding along it.
RANK_AXES = {LORA_DOWN: 2, LORA_UP: 1}
# The most rank one sample's adapters may add up to (the engines' `lora_rank` range). The inputs grow with it
# (SD 1.5's UNet: 0.19 M features in, 0.24 M out, × rank × batch), so a compiled engine's largest profile stays sane.
MAX_RANK = 128
TEXT_ENCODER = "text_encoder"
# The pipeline fact (manifest) that holds, per component taking adapters, its `module_facts`.
ADAPTER_MODULES = "adapter_modules"
UNETS = ("unet", "unet_pix2pix", "unet_inpaint", "unet_control", "unet_inpaint_control")
# The served models whose calls carry a request's adapters, and the component that takes them.
ADAPTED_MODELS = {"encode_prompt": TEXT_ENCODER, TEXT_ENCODER: TEXT_ENCODER, **{u: u for u in UNETS}}


# --- which layers adapters reach --------------------------------------------------------------------

def lora_layers(module: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every layer a per-request adapter may reach, in a fixed order: the linear layers and
    1×1 convolutions of a UNet's attention blocks, the linear layers of a text encoder's transformer layers
    (the layers diffusers' and kohya's SD adapters train)."""
    import torch

    text = type(module).__module__.startswith("transformers")
    found = []
    for name, layer in module.named_modules():
        inside = ".layers." in f".{name}" if text else ".attentions." in f".{name}"
        if not inside or "lora_" in name or ".base_layer" in f".{name}":
            continue
        base = getattr(layer, "base_layer", layer)  # a layer peft put an adapter on: the layer it wraps
        if isinstance(base, torch.nn.Linear) or (isinstance(base, torch.nn.Conv2d) and base.kernel_size == (1, 1)
                                                  and base.groups == 1):
            found.append((name, layer))
    return found


def layer_features(layer: Any) -> tuple[int, int]:
    """(in, out) features of a linear layer or a 1×1 convolution."""
    weight = getattr(layer, "base_layer", layer).weight
    return int(weight.shape[1]), int(weight.shape[0])


def totals(module: Any) -> tuple[int, int]:
    """Σ in and Σ out features over `lora_layers`: the packed inputs' fixed sizes."""
    sizes = [layer_features(layer) for _, layer in lora_layers(module)]
    return sum(s[0] for s in sizes), sum(s[1] for s in sizes)


def module_facts(module: Any) -> dict[str, Any]:
    """What the engine directory keeps to rebuild the component's shape without its weights (`skeleton`)."""
    cls = type(module)
    return {"class": f"{cls.__module__.split('.')[0]}.{cls.__name__}", "config": _plain(module.config)}


def _plain(config: Any) -> dict[str, Any]:
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool, list, dict, type(None)))}


def skeleton(facts: Mapping[str, Any]) -> Any:
    """The component's module with every weight a zero-strided zero: its layers' names and shapes, no memory."""
    import importlib

    import torch

    package, name = facts["class"].split(".")
    cls = getattr(importlib.import_module(package), name)
    config = dict(facts["config"])
    with torch.device("meta"):
        if package == "transformers":
            module = cls(cls.config_class.from_dict(config))
        else:
            module = cls.from_config(config)
    for sub in module.modules():
        for key, value in list(sub._parameters.items()):
            if value is not None:
                sub._parameters[key] = torch.nn.Parameter(torch.zeros((), dtype=value.dtype).expand(value.shape),
                                                          requires_grad=False)
        for key, value in list(sub._buffers.items()):
            if value is not None:
                sub._buffers[key] = torch.zeros((), dtype=value.dtype).expand(value.shape)
    return module.eval()


# --- one adapter, packed per component --------------------------------------------------------------

@dataclass(frozen=True)
class Packed:
    """One adapter's update of one component: down [Σ in, rank] and up [rank, Σ out] (its scaling folded in)."""

    down: np.ndarray
    up: np.ndarray

    @property
    def rank(self) -> int:
        return self.down.shape[1]


@dataclass(frozen=True)
class Adapter:
    name: str
    parts: Mapping[str, Packed]  # component -> its update (components the adapter leaves alone: absent)


def load_adapter(name: str, path: str | Path, modules: Mapping[str, Mapping[str, Any]]) -> Adapter:
    """Read the adapter file at `path` for the components `modules` describes (component -> `module_facts`).

    Raises InvalidInputError for a file diffusers cannot read, an adapter of another base model (a size
    mismatch), one that reaches layers per-request adapters do not, or one that touches none of them."""
    from diffusers import StableDiffusionPipeline

    where = f"LoRA {name!r} ({path})"
    if not Path(path).exists():
        raise InvalidInputError(f"{where}: no such file or folder")
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    except Exception as err:  # noqa: BLE001 - any reader failure is a file that is not an adapter
        raise InvalidInputError(f"{where}: not a LoRA file diffusers reads ({_first_line(err)})") from None
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in state):
        raise InvalidInputError(f"{where}: a DoRA adapter; per-request adapters are plain LoRA "
                                f"(fuse it with `ti2i export --lora`)")
    unreached = sorted({key.split(".")[0] for key in state} - {"unet", *({TEXT_ENCODER} & set(modules))})
    if unreached:  # SDXL's text encoders: a request's adapter would be applied in part, silently
        raise InvalidInputError(f"{where} adapts {', '.join(unreached)}, which per-request adapters do not reach "
                                f"on this model")
    parts: dict[str, Packed] = {}
    misfits: list[_Misfit] = []
    for component, facts in modules.items():
        try:
            packed = _pack(where, component, facts, state, alphas)
        except _Misfit as err:  # another architecture (SDXL's refiner beside its base): not adapted
            misfits.append(err)
            continue
        if packed is not None:
            parts[component] = packed
    if not parts:
        if misfits:
            raise misfits[0]
        raise InvalidInputError(f"{where}: none of its weights reach {', '.join(modules)} (an adapter of another "
                                f"model family?)")
    return Adapter(name, parts)


class _Misfit(InvalidInputError):
    """The adapter's weights do not fit one component's shapes."""


def _pack(where: str, component: str, facts: Mapping[str, Any], state: dict[str, Any], alphas: Any) -> Packed | None:
    import torch
    from peft.tuners.lora import LoraLayer

    prefix = "text_encoder." if component == TEXT_ENCODER else "unet."
    if not any(k.startswith(prefix) for k in state):
        return None
    module = skeleton(facts)
    loaded = "ti2i"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on a fresh module's config: nothing for a user to do
            _load_into(module, component, state, alphas, loaded)
    except Exception as err:  # noqa: BLE001 - a size mismatch or keys of another architecture
        raise _Misfit(f"{where} does not fit this model's {component} (an adapter of another base "
                      f"model?): {_first_line(err)}") from None
    layers = lora_layers(module)
    reached = {name for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}
    outside = sorted(reached - {name for name, _ in layers})
    if outside:
        raise InvalidInputError(f"{where} reaches {component} layers that per-request adapters do not "
                                f"({', '.join(outside[:3])}{', …' if len(outside) > 3 else ''}): fuse it into the "
                                f"engines with `ti2i export --lora` instead")
    if not reached:
        return None
    rank = max(layer.r[loaded] for name, layer in layers if name in reached)
    total_in, total_out = totals(module)
    down = torch.zeros(total_in, rank)
    up = torch.zeros(rank, total_out)
    row = col = 0
    with torch.no_grad():
        for name, layer in layers:
            features_in, features_out = layer_features(layer)
            if name in reached:
                r = layer.r[loaded]
                a = layer.lora_A[loaded].weight.reshape(r, features_in)
                b = layer.lora_B[loaded].weight.reshape(features_out, r)
                down[row:row + features_in, :r] = a.T
                up[:r, col:col + features_out] = b.T * layer.scaling[loaded]
            row += features_in
            col += features_out
    return Packed(down.numpy(), up.numpy())


def _load_into(module: Any, component: str, state: dict[str, Any], alphas: Any, name: str) -> None:
    """`load_lora_weights`' own loading of one component (a misfit raises, once, not also logs every tensor)."""
    import logging

    from diffusers import StableDiffusionPipeline

    log = logging.getLogger("diffusers.loaders.peft")
    was, log.disabled = log.disabled, True
    try:
        if component == TEXT_ENCODER:
            StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=module, adapter_name=name)
        else:
            StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=module, adapter_name=name)
    finally:
        log.disabled = was


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


# --- a request's adapters ---------------------------------------------------------------------------

Chosen = tuple[tuple[Adapter, float], ...]  # a request's adapters and their scales


def parse_choice(text: str) -> tuple[str, float]:
    """``NAME`` or ``NAME:SCALE`` (a path may hold ':' itself: only a number after the last one is a scale)."""
    name, sep, scale = text.strip().rpartition(":")
    if sep:
        try:
            return name, float(scale)
        except ValueError:
            pass
    return text.strip(), 1.0


class AdapterRegistry:
    """The adapters a runner's requests may name.

    Served (`named` given, `ti2i serve --lora NAME=PATH`): only those names, each loaded once at start.
    In-process (`named` None): a path, loaded on first use and kept.
    """

    def __init__(self, modules: Mapping[str, Mapping[str, Any]], named: Mapping[str, str] | None = None):
        self.modules = dict(modules)
        self.served = named is not None
        self._loaded: dict[str, Adapter] = {}
        self._lock = threading.Lock()
        if not self.modules and named:
            raise InvalidInputError("--lora: these engines take no per-request adapters (export them again with "
                                    "this version of ti2i)")
        for name, path in (named or {}).items():
            self._loaded[name] = load_adapter(name, path, self.modules)

    @property
    def names(self) -> list[str]:
        return sorted(self._loaded) if self.served else []

    def choose(self, texts: Sequence[str]) -> Chosen:
        """The adapters `texts` name (``NAME[:SCALE]`` each; one element may list several, comma-separated)."""
        chosen = []
        for text in (part for item in texts for part in str(item).split(",") if part.strip()):
            name, scale = parse_choice(text)
            if not np.isfinite(scale):
                raise InvalidInputError(f"lora {text!r}: the scale must be a finite number")
            chosen.append((self._adapter(name), scale))
        if sum(max((a.parts[c].rank for c in a.parts), default=0) for a, _ in chosen) > MAX_RANK:
            raise InvalidInputError(f"lora {', '.join(texts)}: the adapters' ranks add up past {MAX_RANK}")
        return tuple(chosen)

    def _adapter(self, name: str) -> Adapter:
        if not self.modules:
            raise InvalidInputError("these engines take no per-request adapters (export them again with this "
                                    "version of ti2i)")
        with self._lock:
            if name not in self._loaded:
                if self.served:
                    known = ", ".join(sorted(self._loaded)) or "none (`ti2i serve --lora NAME=PATH` registers them)"
                    raise InvalidInputError(f"unknown LoRA {name!r}: this server's adapters are {known}")
                self._loaded[name] = load_adapter(name, name, self.modules)
            return self._loaded[name]


def adapter_inputs(chosen: Chosen, component: str, rows: int, like: Any = None) -> dict[str, Any]:
    """The adapter inputs of a call of `component` whose `rows` samples all take the adapters `chosen`; empty
    when none of them reaches `component` (the engine's default, no adapter, applies)."""
    parts = [(a.parts[component], scale) for a, scale in chosen if component in a.parts]
    if not parts:
        return {}
    down = np.concatenate([p.down for p, _ in parts], axis=1)
    up = np.concatenate([p.up * np.float32(scale) for p, scale in parts], axis=0)
    return _rows(down, up, rows, like)


def _rows(down: np.ndarray, up: np.ndarray, rows: int, like: Any) -> dict[str, Any]:
    """down and up repeated for `rows` samples: torch tensors on `like`'s device if it is one, else numpy."""
    down, up = np.repeat(down[None], rows, axis=0), np.repeat(up[None], rows, axis=0)  # writable copies
    if _is_torch(like):
        import torch

        return {LORA_DOWN: torch.from_numpy(down).to(like.device), LORA_UP: torch.from_numpy(up).to(like.device)}
    return {LORA_DOWN: down, LORA_UP: up}


def _is_torch(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def takes_adapters(spec: Any) -> bool:
    return any(t.name == LORA_DOWN for t in spec.inputs)


def with_defaults(spec: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`inputs`, with "no adapter" (rank-1 zeros) where the spec takes adapters and the caller sent none."""
    inputs = dict(inputs)
    if not inputs or LORA_DOWN in inputs or not takes_adapters(spec):
        return inputs
    first = next(iter(inputs.values()))
    try:
        rows = len(first)
    except TypeError:  # not a batch: the spec's validation names it
        return inputs
    down = np.zeros((spec.input(LORA_DOWN).shape[1], 1), np.float32)
    up = np.zeros((1, spec.input(LORA_UP).shape[2]), np.float32)
    inputs.update(_rows(down, up, rows, first))
    return inputs


def pad_rank(value: Any, name: str, rank: int) -> Any:
    """An adapter input zero-padded along its rank axis to `rank` (numpy or torch)."""
    axis = RANK_AXES[name]
    missing = rank - value.shape[axis]
    if missing <= 0:
        return value
    if _is_torch(value):
        import torch

        shape = list(value.shape)
        shape[axis] = missing
        return torch.cat([value, value.new_zeros(shape)], dim=axis)
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, missing)
    return np.pad(value, widths)
