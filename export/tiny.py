"""Tiny random-weight diffusers model folders, written entirely offline.

Tests and smoke runs need a real Stable Diffusion 1.x folder layout (so the same loading and
export code paths run as for the real checkpoints) but cannot download gigabytes of weights.
The models here have every real layer type (cross-attention, several resolution levels,
GroupNorm, the VAE mid-block attention, a CLIP text transformer, a byte-level BPE tokenizer)
at sizes that make a whole 64x64 pipeline run take a fraction of a second on a CPU.

Kind "inpaint" is an SD 1.x inpainting folder (a 9-channel UNet: noise latent, mask and
masked-image latent; DDIM, as the inpainting checkpoints ship) sharing "sd"'s text encoder and VAE.

The video kinds follow the same idea: "svd" is a Stable Video Diffusion img2vid folder
(spatio-temporal UNet, temporal-decoder VAE, CLIP vision encoder, SVD's EDM Euler scheduler) and
"videoldm" is the "sd" folder plus an AnimateDiff-style MotionAdapter that fits its UNet.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    MotionAdapter,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from ti2i.errors import InvalidInputError

TINY_KINDS = ("sd", "pix2pix", "svd", "videoldm", "inpaint", "sdxl", "sdxl_pix2pix", "sdxl_inpaint",
              "sdxl_refiner")

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MAX_LENGTH = 77
TEXT_HIDDEN = 32  # CLIP hidden size == UNet cross_attention_dim
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.18215
# The tiny SD UNet's shape; the "videoldm" MotionAdapter must match it block for block.
UNET_BLOCK_OUT_CHANNELS = (32, 64)
UNET_LAYERS_PER_BLOCK = 1
UNET_NORM_GROUPS = 8

# SDXL: two text encoders whose penultimate states are concatenated (the UNet's cross-attention width), the
# second's pooled projection and six size numbers (each embedded in SDXL_TIME_EMBED_DIM) as its text-time input.
SDXL_TEXT_HIDDEN_2 = 48
SDXL_POOLED_DIM = 40
SDXL_TIME_EMBED_DIM = 8
SDXL_VAE_SCALING_FACTOR = 0.13025

# Stable Video Diffusion: frame count, micro-conditioning embedding size and the CLIP image side.
SVD_NUM_FRAMES = 8  # the UNet's default frame count (the real img2vid has 14, img2vid-xt 25)
SVD_TIME_EMBED_DIM = 32  # addition_time_embed_dim; fps, motion_bucket_id, noise_aug_strength -> 3x
SVD_CROSS_ATTENTION_DIM = 32  # == CLIP image projection_dim
CLIP_IMAGE_SIZE = 224  # the SVD pipeline always resizes its CLIP input to 224x224
# Std of the random values given to the MotionAdapter's proj_out layers (AnimateDiff zero-inits them).
MOTION_PROJ_OUT_STD = 0.02

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


def build_tokenizer(pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A CLIP BPE tokenizer that pads with EOS to 77 tokens, like SD 1.5's (SDXL's second pads with "!")."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=MAX_LENGTH,
    )


def _text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer; token ids match the tokenizer so pooling finds EOS."""
    return CLIPTextModel(_text_config(tokenizer, TEXT_HIDDEN, TEXT_HIDDEN)).eval()


def build_text_encoder_2(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """SDXL's second encoder: wider, three layers (SDXL takes the penultimate), with the pooled projection."""
    return CLIPTextModelWithProjection(_text_config(tokenizer, SDXL_TEXT_HIDDEN_2, SDXL_POOLED_DIM, 3)).eval()


def build_sdxl_unet(in_channels: int = LATENT_CHANNELS, refiner: bool = False) -> UNet2DConditionModel:
    """A two-level SDXL UNet: text-time conditioning (pooled text + six size numbers), cross-attention over both
    encoders' states, several transformer layers in the deeper block (as SDXL's 1/2/10). `in_channels` as
    `build_unet`'s. The refiner's attends to the second encoder's states only and takes five numbers (the
    aesthetic score in place of the target size)."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=SDXL_TEXT_HIDDEN_2 if refiner else TEXT_HIDDEN + SDXL_TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + (5 if refiner else 6) * SDXL_TIME_EMBED_DIM,
        norm_num_groups=UNET_NORM_GROUPS,
    ).eval()


def build_unet(in_channels: int) -> UNet2DConditionModel:
    """A two-level SD 1.x UNet (cross-attention down/up blocks, mid-block attention).

    in_channels is 4 for text-to-image/img2img, 8 for InstructPix2Pix (latents + image latents) and
    9 for inpainting (latents + mask + masked-image latents).
    """
    return UNet2DConditionModel(
        sample_size=8,  # x8 VAE -> 64x64 default image size
        in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        layers_per_block=UNET_LAYERS_PER_BLOCK,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=UNET_NORM_GROUPS,
    ).eval()


def build_vae(scaling_factor: float = VAE_SCALING_FACTOR) -> AutoencoderKL:
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
        scaling_factor=scaling_factor,
    ).eval()
    _calibrate_vae_posterior(vae)
    return vae


@torch.no_grad()
def _calibrate_vae_posterior(vae: AutoencoderKL | AutoencoderKLTemporalDecoder) -> None:
    """Give the random encoder SD-like latent statistics, so img2img output depends on its input.

    Freshly initialised, the posterior mean has std ~0.2 and the log-variance ~0: scaled by 0.18215
    the image signal would drown in the sampling noise. SD's VAE gives latents * scaling_factor of
    about unit std and a near-deterministic posterior, so rescale the mean half of quant_conv to
    that on a fixed probe image and pin the log-variance half near -10.

    SVD's VAE has the same encoder; its pipeline feeds the *unscaled* posterior mode to the UNet as
    the conditioning image (std ~1/0.18215 for the real model), so the same calibration applies.
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


# scheduler/scheduler_config.json of the SD 1.x inpainting checkpoint (runwayml/stable-diffusion-inpainting,
# mirrored as stable-diffusion-v1-5/stable-diffusion-inpainting): DDIM, with PNDM's skip_prk_steps left in.
SD15_INPAINT_DDIM_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
}


def build_inpaint_scheduler() -> DDIMScheduler:
    """The SD 1.x inpainting scheduler, so timesteps match what the real checkpoint would use."""
    return DDIMScheduler.from_config(SD15_INPAINT_DDIM_CONFIG)


def build_pndm_scheduler() -> PNDMScheduler:
    """The SD 1.5 scheduler, so timesteps match what the real checkpoint would use."""
    return PNDMScheduler.from_config(SD15_PNDM_CONFIG)


def build_euler_ancestral_scheduler() -> EulerAncestralDiscreteScheduler:
    """The InstructPix2Pix scheduler, so timesteps match what the real checkpoint would use."""
    return EulerAncestralDiscreteScheduler.from_config(PIX2PIX_EULER_A_CONFIG)


# scheduler/scheduler_config.json of stabilityai/stable-video-diffusion-img2vid(-xt): EDM-style
# Karras sigmas between 0.002 and 700 on continuous timesteps, v-prediction. set_alpha_to_one,
# skip_prk_steps and clip_sample are not EulerDiscreteScheduler arguments but the hub file has
# them, and from_config keeps them in the saved config.
SVD_EULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "v_prediction",
    "interpolation_type": "linear",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "steps_offset": 1,
    "final_sigmas_type": "zero",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}

# feature_extractor/preprocessor_config.json of stabilityai/stable-video-diffusion-img2vid(-xt)
# (OpenCLIP ViT-H statistics). The pipeline itself resizes to 224x224 and passes do_resize=False,
# do_center_crop=False, do_rescale=False, so only the normalisation is used there.
SVD_FEATURE_EXTRACTOR_CONFIG: dict[str, object] = {
    "crop_size": {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": CLIP_IMAGE_SIZE},
}


# scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0
SDXL_EULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
}


def build_svd_scheduler() -> EulerDiscreteScheduler:
    """The SVD scheduler, so sigmas and timesteps match what the real checkpoint would use."""
    return EulerDiscreteScheduler.from_config(SVD_EULER_CONFIG)


def build_svd_unet() -> UNetSpatioTemporalConditionModel:
    """A two-level SVD UNet: spatial + temporal resnets and transformers, fps/motion/noise embeddings.

    in_channels 8 = noisy latents + the (repeated) conditioning image latents.
    """
    return UNetSpatioTemporalConditionModel(
        sample_size=8,  # x8 VAE -> 64x64
        in_channels=2 * LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),  # GroupNorm has 32 groups here: multiples of 32 only
        addition_time_embed_dim=SVD_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=3 * SVD_TIME_EMBED_DIM,
        layers_per_block=1,
        cross_attention_dim=SVD_CROSS_ATTENTION_DIM,
        num_attention_heads=(2, 4),  # head dim 16 at both levels
        num_frames=SVD_NUM_FRAMES,
    ).eval()


def build_temporal_vae() -> AutoencoderKLTemporalDecoder:
    """SVD's VAE: the SD KL encoder and a decoder with temporal resnets and a temporal conv_out.

    Four levels give vae_scale_factor 8; 32 channels is the floor (its GroupNorms use 32 groups).
    """
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    ).eval()
    _calibrate_vae_posterior(vae)
    return vae


def build_image_encoder() -> CLIPVisionModelWithProjection:
    """A 2-layer CLIP vision transformer on 224x224 input; 32x32 patches keep it to 49 tokens."""
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=SVD_CROSS_ATTENTION_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=32,
        hidden_act="gelu",  # OpenCLIP ViT-H, as in SVD's image_encoder/config.json
    )
    return CLIPVisionModelWithProjection(config).eval()


def build_feature_extractor() -> CLIPImageProcessor:
    """SVD's CLIP image processor settings."""
    return CLIPImageProcessor(**SVD_FEATURE_EXTRACTOR_CONFIG)


def build_motion_adapter() -> MotionAdapter:
    """An AnimateDiff MotionAdapter that fits the tiny SD UNet (same levels, layers, norm groups), its motion
    layers mixing frames (`mixing_frames`)."""
    adapter = MotionAdapter(
        block_out_channels=UNET_BLOCK_OUT_CHANNELS,
        motion_layers_per_block=UNET_LAYERS_PER_BLOCK,
        motion_transformer_layers_per_block=1,
        motion_mid_block_layers_per_block=1,
        motion_transformer_layers_per_mid_block=1,
        motion_num_attention_heads=4,  # head dims 8 and 16
        motion_norm_num_groups=UNET_NORM_GROUPS,
        motion_max_seq_length=32,
        use_motion_mid_block=True,
    ).eval()
    return mixing_frames(adapter)


def mixing_frames(adapter: MotionAdapter) -> MotionAdapter:
    """Give an untrained adapter's temporal proj_out (zero-initialised, as AnimateDiff trains it from zero) small
    random values, so that its motion layers mix frames instead of being an exact no-op."""
    with torch.no_grad():
        for name, module in adapter.named_modules():
            if name.endswith("proj_out") and isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, MOTION_PROJ_OUT_STD)
                module.bias.normal_(0.0, MOTION_PROJ_OUT_STD)
    return adapter


def _write_vocab_files(tokenizer_dir: Path) -> None:
    """Also write the classic vocab.json + merges.txt, so slow/older tokenizer loaders work too."""
    vocab, merges = _vocab_and_merges()
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tokenizer_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _save_quietly(pipe_or_model: object, out: Path) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    pipe_or_model.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]


def _write_svd(out: Path, seed: int) -> Path:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        image_encoder = build_image_encoder()
        vae = build_temporal_vae()
        unet = build_svd_unet()
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=build_svd_scheduler(),
        feature_extractor=build_feature_extractor(),
    )
    _save_quietly(pipe, out)
    # Without torchvision, transformers 5 hands out CLIPImageProcessorPil for CLIPImageProcessor and
    # diffusers records that class name; write what the real repository has.
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _write_videoldm(out: Path, seed: int) -> Path:
    write_tiny_model("sd", out / "sd", seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = build_motion_adapter()
    _save_quietly(adapter, out / "motion_adapter")
    return out


_SDXL_PIPELINES = {"sdxl": (4, StableDiffusionXLPipeline),
                   "sdxl_pix2pix": (8, StableDiffusionXLInstructPix2PixPipeline),
                   "sdxl_inpaint": (9, StableDiffusionXLInpaintPipeline),
                   "sdxl_refiner": (4, StableDiffusionXLImg2ImgPipeline)}


def _write_sdxl(kind: str, out: Path, seed: int) -> Path:
    refiner = kind == "sdxl_refiner"
    in_channels, pipeline_cls = _SDXL_PIPELINES[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer(pad_token="!")
        text_encoder = build_text_encoder(tokenizer)
        text_encoder_2 = build_text_encoder_2(tokenizer_2)
        vae = build_vae(SDXL_VAE_SCALING_FACTOR)
        # drawn last: the kinds share the encoders and the VAE (the refiner: the second encoder and the VAE)
        unet = build_sdxl_unet(in_channels, refiner)
    if refiner:  # as stable-diffusion-xl-refiner-1.0: one text encoder, aesthetic scores, "" for no negative
        pipe = pipeline_cls(vae=vae, text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
                            tokenizer_2=tokenizer_2, unet=unet,
                            scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG),
                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    else:
        pipe = pipeline_cls(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                            tokenizer_2=tokenizer_2, unet=unet,
                            scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER_CONFIG),
                            force_zeros_for_empty_prompt=True)
    _save_quietly(pipe, out)
    for folder in ("tokenizer_2",) if refiner else ("tokenizer", "tokenizer_2"):
        _write_vocab_files(out / folder)
    return out


def write_tiny_model(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight diffusers folder of the given kind and return its path.

    kind "sd" loads with StableDiffusionPipeline / StableDiffusionImg2ImgPipeline,
    kind "pix2pix" with StableDiffusionInstructPix2PixPipeline (both with safety_checker=None),
    kind "inpaint" with StableDiffusionInpaintPipeline (same text encoder and VAE as "sd" for the seed),
    kind "svd" with StableVideoDiffusionPipeline, kinds "sdxl", "sdxl_pix2pix" and "sdxl_inpaint" with the
    StableDiffusionXL (Img2Img), InstructPix2Pix and Inpaint pipelines (sharing encoders and VAE for the seed),
    kind "sdxl_refiner" (the base's second encoder and VAE for the seed) with StableDiffusionXLImg2ImgPipeline.
    Kind "videoldm" writes two folders: out_dir/sd (exactly the "sd" model for that seed) and
    out_dir/motion_adapter (a MotionAdapter for UNetMotionModel.from_unet2d / the AnimateDiff pipelines).
    The same seed always gives the same weights; the global torch RNG state is left untouched.
    """
    if kind not in TINY_KINDS:
        raise InvalidInputError(f"unknown tiny model kind {kind!r}; allowed kinds: {', '.join(TINY_KINDS)}")
    out = Path(out_dir)
    if kind == "svd":
        return _write_svd(out, seed)
    if kind == "videoldm":
        return _write_videoldm(out, seed)
    if kind in _SDXL_PIPELINES:
        return _write_sdxl(kind, out, seed)
    scheduler: SchedulerMixin
    pipeline_cls: (type[StableDiffusionPipeline] | type[StableDiffusionInstructPix2PixPipeline]
                   | type[StableDiffusionInpaintPipeline])
    if kind == "sd":
        in_channels, scheduler, pipeline_cls = 4, build_pndm_scheduler(), StableDiffusionPipeline
    elif kind == "inpaint":
        in_channels, scheduler, pipeline_cls = 9, build_inpaint_scheduler(), StableDiffusionInpaintPipeline
    else:
        in_channels, scheduler = 8, build_euler_ancestral_scheduler()
        pipeline_cls = StableDiffusionInstructPix2PixPipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        text_encoder = build_text_encoder(tokenizer)
        vae = build_vae()
        # Drawn last, so the image kinds share the text encoder and VAE at the same seed (as
        # instruct-pix2pix and the inpainting model share SD 1.5's) and their engines can live in one
        # engine directory.
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
    _save_quietly(pipe, out)
    _write_vocab_files(out / "tokenizer")
    return out


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# What LCM-LoRA trains: attention, feed-forward, the ResNets' convolutions and time projections as well.
LCM_TARGETS = (*ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut",
               "time_emb_proj")


def write_random_lora(model: str | Path, out: str | Path, seed: int, text_encoder: bool = True, rank: int = 4,
                      unet_targets: tuple[str, ...] = ATTENTION) -> Path:
    """A random LoRA adapter for `model`'s UNet layers `unet_targets` (and its text encoder's attention), saved
    as diffusers' `save_lora_weights` writes one: peft layers with random weights (`init_lora_weights=False`),
    so that it changes the result, for tests and the adapter benchmark."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=list(unet_targets)))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(encoder))
    StableDiffusionPipeline.save_lora_weights(out, **layers)
    return Path(out)


def write_random_controlnet(model: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A ControlNet for `model`'s UNet (`ControlNetModel.from_unet`: its encoder copied) saved with
    `save_pretrained`. A trained ControlNet's zero convolutions start at zero, so an untrained one changes
    nothing: here they are random, so that the control image changes the result (tests)."""
    from diffusers import ControlNetModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        for conv in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
            torch.nn.init.normal_(conv.weight, std=0.3)
            torch.nn.init.normal_(conv.bias, std=0.3)
    _save_quietly(net.eval(), Path(out))
    return Path(out)
