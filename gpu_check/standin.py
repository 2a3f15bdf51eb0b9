"""A stand-in SD engine directory on AOTInductor packages, for running a whole method loop on a GPU machine
that has torch and diffusers but neither ONNX Runtime nor transformers.

Its text encoder, VAE encoder and VAE decoder are a few plain torch layers of the real interfaces'
shapes, its UNet the block stack of `gpu_check/blocks.py`, each compiled for the device; its tokenizer
maps UTF-8 bytes to ids. The figures it gives mean nothing; what it shows is where the loop's tensors
live (`gpu_check/test_gpu.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ti2i.client.runners import InProcessRunner
from ti2i.engines import builds, profiles
from ti2i.engines.base import Engine
from ti2i.engines.processing import STEPS
from ti2i.manifest import ONNX, PROCESSING, ComponentEntry, Manifest
from ti2i.spec import BATCH, ComponentSpec, TensorSpec

SIDE = 512  # pixels (latent 64²: the block stack's size)
LATENT = SIDE // 8
CONTEXT = 64
TOKENS = 77
# scheduler/scheduler_config.json of SD 1.5 (PNDM), as export/tiny.py writes it
PNDM = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading"}
PIPELINE = {"vae_scale_factor": 8, "vae_scaling_factor": 0.18215, "latent_channels": 4, "tokenizer": "tokenizer",
            "max_length": TOKENS, "unets": {"unet": {"scheduler": PNDM, "default_size": SIDE, "in_channels": 4}}}


class TextStandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(256, CONTEXT)
        self.proj = nn.Linear(CONTEXT, CONTEXT)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids.long()))


class EncoderStandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)

    def forward(self, images: torch.Tensor):
        mean, logvar = self.conv(images).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class DecoderStandIn(nn.Module):
    def __init__(self):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(4, 3, 8, stride=8)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.deconv(latent))


def _spec(name: str, inputs, outputs, batch: int) -> ComponentSpec:
    dims = {BATCH: (batch, batch), "image_height": (SIDE, SIDE), "image_width": (SIDE, SIDE),
            "height": (LATENT, LATENT), "width": (LATENT, LATENT)}
    used = {d for t in (*inputs, *outputs) for d in t.shape if isinstance(d, str)}
    return ComponentSpec(name, tuple(inputs), tuple(outputs), {d: r for d, r in dims.items() if d in used})


def network_specs() -> dict[str, ComponentSpec]:
    pixels, latent = (BATCH, 3, "image_height", "image_width"), (BATCH, 4, "height", "width")
    return {
        "text_encoder": _spec("text_encoder", [TensorSpec("input_ids", "int32", (BATCH, TOKENS), (0, 256), (0, 255))],
                              [TensorSpec("text_embeddings", "float32", (BATCH, TOKENS, CONTEXT))], batch=2),
        "vae_encoder": _spec("vae_encoder", [TensorSpec("images", "float32", pixels)],
                             [TensorSpec("latent_mean", "float32", latent),
                              TensorSpec("latent_logvar", "float32", latent)], batch=1),
        "vae_decoder": _spec("vae_decoder", [TensorSpec("latent", "float32", latent)],
                             [TensorSpec("images", "float32", pixels)], batch=1),
    }


def write_standin_engines(root: Path, unet_package: Path, unet_spec: ComponentSpec, unet_multiple: int | None,
                          device: str = "cuda") -> Path:
    """The engine directory at `root`: the three stand-ins compiled here for `device` (static shapes), the
    UNet package given (compiled by the caller), the processing steps; returns `root`."""
    from ti2i.export.aoti import _export

    root.mkdir(parents=True, exist_ok=True)
    index = builds.BuildIndex.load(root, "aoti")
    torch.manual_seed(0)
    modules = {"text_encoder": TextStandIn(), "vae_encoder": EncoderStandIn(), "vae_decoder": DecoderStandIn()}
    specs = network_specs()
    for name, module in modules.items():
        prof = profiles.profile(specs[name])
        program, _ = _export(module.eval().to(device), specs[name], prof, device, dynamic=False)
        facts = builds.aoti_facts(name, torch.__version__, device, "fp32", prof, False)
        key = builds.build_key(facts)
        file = builds.file_name(name, key, ".pt2")
        index.root.mkdir(parents=True, exist_ok=True)
        torch._inductor.aoti_compile_and_package(program, package_path=str(index.root / file))
        index.record(name, key, file, facts, dynamic=False, device=device, precision="fp32")
    prof = profiles.profile(unet_spec)
    facts = builds.aoti_facts("unet", torch.__version__, device, "fp16", prof, unet_multiple is not None)
    key = builds.build_key(facts)
    file = builds.file_name("unet", key, ".pt2")
    (index.root / file).write_bytes(Path(unet_package).read_bytes())
    index.record("unet", key, file, facts, dynamic=unet_multiple is not None, multiple=unet_multiple, device=device,
                 precision="fp16")
    components = {name: ComponentEntry(spec, ONNX, precision="fp32") for name, spec in specs.items()}
    components["unet"] = ComponentEntry(unet_spec, ONNX, precision="fp16")
    for name in ("tokenize", "image_preprocess", "image_postprocess"):
        components[name] = ComponentEntry(STEPS[name].spec(PIPELINE), PROCESSING)
    Manifest(root, "fp16", PIPELINE, components, {"torch": torch.__version__}, {"sd": "gpu_check stand-in"}).write()
    return root


class ByteTokenizer(Engine):
    """UTF-8 bytes as token ids, padded with 0 to the sequence length (no transformers needed)."""

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.zeros((len(inputs["text"]), TOKENS), dtype=np.int32)
        for i, text in enumerate(inputs["text"].reshape(-1)):
            data = (text if isinstance(text, bytes) else str(text).encode())[:TOKENS]
            ids[i, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        return {"input_ids": ids}


class StandInRunner(InProcessRunner):
    """The in-process runner over the stand-in directory, its tokenizer the byte tokenizer."""

    def engine(self, name: str) -> Engine:
        if name == "tokenize" and name not in self._engines:
            self._engines[name] = ByteTokenizer(self.manifest.components[name].spec)
        return super().engine(name)
