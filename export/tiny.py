"""Tiny random-weight diffusers model folders, written entirely offline.

Tests and smoke runs need a real Stable Diffusion 1.x folder layout (so the same loading and
export code paths run as for the real checkpoints) but cannot download gigabytes of weights.
The models here have every real layer type (cross-attention, several resolution levels,
GroupNorm, the VAE mid-block attention, a CLIP text transformer, a byte-level BPE tokenizer)
at sizes that make a whole 64x64 pipeline run take a fraction of a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ti2i.errors import InvalidInputError

TINY_KINDS = ("sd", "pix2pix")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32  # CLIP hidden size == UNet cross_attention_dim
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.18215

# A few BPE merges so common words become single tokens, as with the real CLIP vocabulary.
# Each pair's parts must already be in the vocabulary when it is listed (order = priority).
_MERGES: tuple[tuple[str, str], ...] = (
    ("t", "h"),
    ("th", "e</w>"),
    ("o", "f</w>"),
    ("c", "a"),
    ("ca", "t</w>"),
    ("d", "o"),
    ("do", "g</w>"),
    ("p", "h"),
    ("t", "o</w>"),
    ("ph", "o"),
    ("pho", "to</w>"),
    ("a", "n"),
    ("an", "d</w>"),
    ("i", "n</w>"),
)


def _byte_level_chars() -> list[str]:
    """The 256 printable unicode stand-ins for bytes that GPT-2/CLIP byte-level BPE uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    codes = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + shift)
            shift += 1
    return [chr(c) for c in codes]


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout in miniature: bytes, bytes + "</w>", merges, then BOS/EOS."""
    chars = _byte_level_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}, list(_MERGES)


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer that pads with EOS to 77 tokens, like SD 1.5's."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer; token ids match the tokenizer so pooling finds EOS."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def build_unet(in_channels: int) -> UNet2DConditionModel:
    """A two-level SD 1.x UNet (cross-attention down/up blocks, mid-block attention).

    in_channels is 4 for text-to-image/img2img and 8 for InstructPix2Pix (latents + image latents).
    """
    return UNet2DConditionModel(
        sample_size=8,  # x8 VAE -> 64x64 default image size
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


def build_vae() -> AutoencoderKL:
    """A four-level KL autoencoder: three downsamples give SD's vae_scale_factor of 8."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    ).eval()
    _calibrate_vae_posterior(vae)
    return vae


@torch.no_grad()
def _calibrate_vae_posterior(vae: AutoencoderKL) -> None:
    """Give the random encoder SD-like latent statistics, so img2img output depends on its input.

    Freshly initialised, the posterior mean has std ~0.2 and the log-variance ~0: scaled by 0.18215
    the image signal would drown in the sampling noise. SD's VAE gives latents * scaling_factor of
    about unit std and a near-deterministic posterior, so rescale the mean half of quant_conv to
    that on a fixed probe image and pin the log-variance half near -10.
    """
    ramp = torch.linspace(-1.0, 1.0, 64)
    yy, xx = torch.meshgrid(ramp, ramp, indexing="ij")
    probe = torch.stack([xx, yy, xx * yy])[None]
    mean = vae.encode(probe).latent_dist.mean
    gain = 1.0 / (vae.config.scaling_factor * mean.std())
    c = vae.config.latent_channels
    weight, bias = vae.quant_conv.weight, vae.quant_conv.bias
    weight[:c] *= gain
    bias[:c] *= gain
    weight[c:] *= 0.1
    bias[c:] = -10.0


# scheduler/scheduler_config.json of runwayml/stable-diffusion-v1-5. PNDMScheduler.__init__ has no
# clip_sample argument, but from_config keeps it in the saved config, as SD 1.5's file has it.
SD15_PNDM_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}

# scheduler/scheduler_config.json of timbrooks/instruct-pix2pix.
PIX2PIX_EULER_A_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def build_pndm_scheduler() -> PNDMScheduler:
    """The SD 1.5 scheduler, so timesteps match what the real checkpoint would use."""
    return PNDMScheduler.from_config(SD15_PNDM_CONFIG)


def build_euler_ancestral_scheduler() -> EulerAncestralDiscreteScheduler:
    """The InstructPix2Pix scheduler, so timesteps match what the real checkpoint would use."""
    return EulerAncestralDiscreteScheduler.from_config(PIX2PIX_EULER_A_CONFIG)


def _write_vocab_files(tokenizer_dir: Path) -> None:
    """Also write the classic vocab.json + merges.txt, so slow/older tokenizer loaders work too."""
    vocab, merges = _vocab_and_merges()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_tiny_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight diffusers folder of the given kind and return its path.

    kind "sd" loads with StableDiffusionPipeline / StableDiffusionImg2ImgPipeline,
    kind "pix2pix" with StableDiffusionInstructPix2PixPipeline (both with safety_checker=None).
    The same seed always gives the same weights; the global torch RNG state is left untouched.
    """
    if kind not in TINY_KINDS:
        raise InvalidInputError(f"unknown tiny model kind {kind!r}; allowed kinds: {', '.join(TINY_KINDS)}")
    out = Path(out_dir)
    scheduler: SchedulerMixin
    pipeline_cls: type[StableDiffusionPipeline] | type[StableDiffusionInstructPix2PixPipeline]
    if kind == "sd":
        in_channels, scheduler, pipeline_cls = 4, build_pndm_scheduler(), StableDiffusionPipeline
    else:
        in_channels, scheduler = 8, build_euler_ancestral_scheduler()
        pipeline_cls = StableDiffusionInstructPix2PixPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        text_encoder = build_text_encoder(tokenizer)
        vae = build_vae()
        # Drawn last, so both kinds share the text encoder and VAE at the same seed (as
        # instruct-pix2pix shares SD 1.5's) and their engines can live in one engine directory.
        unet = build_unet(in_channels)

    # The pipeline only serves to write model_index.json and the component subfolders.
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    pipe.save_pretrained(out, safe_serialization=True)
    _write_vocab_files(out / "tokenizer")
    return out
