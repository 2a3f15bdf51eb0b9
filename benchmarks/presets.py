"""Benchmark presets: random-weight model folders with the real architectures, built offline and cached.

A preset says which model folders to build (per model kind: "sd", "pix2pix", "svd"), the request each
method runs (image size, steps, strength, frames) and how many repeats make a measurement. The
folders are written once with ``save_pretrained`` into the cache and exported once into engine
directories next to them, so a rerun starts measuring at once.

* ``tiny``: the ``ti2i tiny`` models (a smoke run takes seconds).
* ``sd15-256``: Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L/14 text encoder at their real sizes
  (random weights: the compute profile is the real one), PNDM as SD 1.5, run at 256×256; its
  InstructPix2Pix and inpainting UNets and AnimateDiff's SD 1.5 motion adapter too, in one engine directory.
* ``svd-small``: the real ``UNetSpatioTemporalConditionModel`` / temporal VAE / CLIP vision block
  structure, scaled down in width so one run takes minutes on 2 cores.
* ``sdxl-tiny``: the ``ti2i tiny`` SDXL models (base, InstructPix2Pix, inpainting) for the same methods.
* ``sdxl-512``: SDXL 1.0 base's UNet (2.57 G parameters), VAE and both text encoders at their real sizes,
  random weights, at 512×512 (exporting it peaks at about 18 GiB; on a 24 GiB host the harness then measures
  diffusers and our engines one after the other).

``--model`` takes a real diffusers folder instead: its kind is detected and it is exported into the
cache like a preset's (keyed by the folder's absolute path).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ti2i.client.registry import METHODS as METHOD_RECORDS
from ti2i.errors import InvalidInputError

CACHE_ENV = "TI2I_BENCH_CACHE"
METHOD_KINDS = {name: record.kind for name, record in METHOD_RECORDS.items()}  # from the method records
METHODS = tuple(METHOD_KINDS)
# Bump when a preset's builder or the exported engines change: the cache key includes it, so stale folders are
# not reused (2: the UNets and text encoder take per-request adapters; 3: group norms in two levels, `export/norms.py`).
BUILD_VERSION = 3


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ti2i" / "bench"


@dataclass(frozen=True)
class Request:
    """What one benchmark request asks of a method (both our loop and the diffusers pipeline)."""

    height: int
    width: int
    steps: int
    strength: float = 0.8  # SDEdit, CycleDiffusion
    guidance: float = 7.5
    frames: int = 0  # SVD
    decode_chunk_size: int = 0  # SVD (0 = all frames at once)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    builders: Mapping[str, Callable[[Path], None]]  # model kind -> writes its diffusers folder
    requests: Mapping[str, Request]  # method -> request
    repeats: int = 5
    warmup: int = 1
    concurrency_requests: int = 4  # requests per client in the concurrency sweep
    extra: Mapping[str, Any] = field(default_factory=dict)

    def request(self, method: str, steps: int | None = None) -> Request:
        req = self.requests[method]
        return replace(req, steps=steps) if steps else req


# --- tiny ---------------------------------------------------------------------------------------------

def _tiny(kind: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        from ti2i.export.tiny import write_tiny_model

        write_tiny_model(kind, out)

    return build


# --- sd15-256: SD 1.5's architecture at its real size, random weights ----------------------------------

SD15_UNET = dict(
    sample_size=64,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    center_input_sample=False,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=512,
    scaling_factor=0.18215,
)
# CLIP ViT-L/14 text tower (openai/clip-vit-large-patch14, as SD 1.5's text_encoder/config.json).
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
)


# AnimateDiff's SD 1.5 motion adapter (guoyww/animatediff-motion-adapter-v1-5-2's config.json).
SD15_MOTION_ADAPTER = dict(
    block_out_channels=(320, 640, 1280, 1280),
    motion_layers_per_block=2,
    motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
    use_motion_mid_block=True,
)


def _sd15(in_channels: int) -> Callable[[Path], None]:
    """SD 1.5 (4 channels), its InstructPix2Pix (8) or inpainting (9) model; the same text encoder and VAE for all
    (drawn first from one seed), so their engines share one engine directory as the real checkpoints' do."""
    def build(out: Path) -> None:
        import torch
        from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline, StableDiffusionInstructPix2PixPipeline,
                               StableDiffusionPipeline, UNet2DConditionModel)
        from transformers import CLIPTextConfig, CLIPTextModel

        from ti2i.export import tiny

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            tokenizer = tiny.build_tokenizer()  # the vocabulary is the encoder's first ids: any id is valid
            assert len(tokenizer) <= CLIP_L_TEXT["vocab_size"]
            text_encoder = CLIPTextModel(CLIPTextConfig(
                **CLIP_L_TEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)).eval()
            vae = AutoencoderKL(**SD15_VAE).eval()
            tiny._calibrate_vae_posterior(vae)
            unet = UNet2DConditionModel(in_channels=in_channels, **SD15_UNET).eval()
        pipeline_cls, scheduler = {
            4: (StableDiffusionPipeline, tiny.build_pndm_scheduler()),
            8: (StableDiffusionInstructPix2PixPipeline, tiny.build_euler_ancestral_scheduler()),
            9: (StableDiffusionInpaintPipeline, tiny.build_inpaint_scheduler())}[in_channels]
        pipe = pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        tiny._write_vocab_files(out / "tokenizer")

    return build


def _sd15_videoldm(out: Path) -> None:
    """SD 1.5 (as `_sd15(4)` writes it) in out/sd and an SD 1.5-size AnimateDiff motion adapter in
    out/motion_adapter, random weights (its temporal proj_out small but not zero, so frames mix)."""
    import torch
    from diffusers import MotionAdapter

    from ti2i.export import tiny

    _sd15(4)(out / "sd")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        adapter = tiny.mixing_frames(MotionAdapter(**SD15_MOTION_ADAPTER).eval())
    adapter.save_pretrained(out / "motion_adapter", safe_serialization=True)


# --- sdxl-512: SDXL 1.0 base's architecture at its real size, random weights ------------------------------

# unet/config.json of stabilityai/stable-diffusion-xl-base-1.0 (2.57 G parameters)
SDXL_UNET = dict(
    sample_size=128,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
# OpenCLIP ViT-bigG/14's text tower (text_encoder_2/config.json of SDXL 1.0); the first encoder is CLIP ViT-L's.
CLIP_BIGG_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=1280,
)


def _sdxl(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ti2i.export import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer, tokenizer_2 = tiny.build_tokenizer(), tiny.build_tokenizer(pad_token="!")
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, **ids, pad_token_id=tokenizer.pad_token_id))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT, **ids,
                                                                    pad_token_id=tokenizer_2.pad_token_id))
        vae = AutoencoderKL(**SDXL_VAE).eval()
        tiny._calibrate_vae_posterior(vae)
        unet = UNet2DConditionModel(in_channels=4, **SDXL_UNET).eval()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=EulerDiscreteScheduler.from_config(tiny.SDXL_EULER_CONFIG))
    pipe.save_pretrained(out, safe_serialization=True)
    for folder in ("tokenizer", "tokenizer_2"):
        tiny._write_vocab_files(out / folder)


# --- svd-small: SVD's block structure, narrower ----------------------------------------------------------

def _svd_small(out: Path) -> None:
    import torch
    from diffusers import AutoencoderKLTemporalDecoder, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ti2i.export import tiny

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # ViT-H/14's layout (patch 14 on 224², gelu) at a quarter of its depth and a fifth of its width.
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=256, intermediate_size=1024, projection_dim=256, num_hidden_layers=8,
            num_attention_heads=4, image_size=224, patch_size=14, hidden_act="gelu")).eval()
        # SVD's temporal VAE: 4 levels, 2 layers per block, at a quarter of (128, 256, 512, 512).
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            block_out_channels=(32, 64, 128, 128), layers_per_block=2, latent_channels=4, sample_size=768,
            scaling_factor=0.18215).eval()
        tiny._calibrate_vae_posterior(vae)
        # SVD's UNet: 3 cross-attention spatio-temporal levels + 1 plain, 2 layers per block, head dim 64,
        # at a fifth of (320, 640, 1280, 1280).
        unet = UNetSpatioTemporalConditionModel(
            sample_size=96, in_channels=8, out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",),
            up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3,
            block_out_channels=(64, 128, 256, 256), addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=768, layers_per_block=2, cross_attention_dim=256,
            transformer_layers_per_block=1, num_attention_heads=(1, 2, 4, 4), num_frames=14).eval()
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=tiny.build_svd_scheduler(),
                                        feature_extractor=tiny.build_feature_extractor())
    pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"  # as export/tiny.py: the real repository's processor class
    index = json.loads(index_path.read_text(encoding="utf-8"))
    index["feature_extractor"] = ["transformers", "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset(
        "tiny", "the `ti2i tiny` random-weight models (every layer type, tiny widths), 64×64",
        {kind: _tiny(kind) for kind in ("sd", "pix2pix", "inpaint", "videoldm", "svd")},
        {"txt2img": Request(64, 64, 10),
         "sdedit": Request(64, 64, 10, strength=0.8),
         "inpaint": Request(64, 64, 10, strength=1.0),
         "ddib": Request(64, 64, 10, strength=0.8, guidance=1.0),
         "videoldm": Request(64, 64, 10, strength=0.8, frames=4),
         "cyclediffusion": Request(64, 64, 10, strength=0.8),
         "pix2pix": Request(64, 64, 8),
         "svd": Request(64, 64, 4, guidance=3.0, frames=8)},
        repeats=10, warmup=2, concurrency_requests=12),  # 6 let one 500 ms stall halve a level's figure
    Preset(
        "sd15-256", "SD 1.5 UNet/VAE/CLIP ViT-L text encoder at their real sizes (random weights), 256×256",
        {"sd": _sd15(4), "pix2pix": _sd15(8), "inpaint": _sd15(9), "videoldm": _sd15_videoldm},
        {"txt2img": Request(256, 256, 10),
         "sdedit": Request(256, 256, 10, strength=0.5),
         "inpaint": Request(256, 256, 10, strength=1.0),
         "ddib": Request(256, 256, 10, strength=0.5, guidance=1.0),
         "cyclediffusion": Request(256, 256, 10, strength=0.5),
         "pix2pix": Request(256, 256, 5),
         "videoldm": Request(256, 256, 5, strength=0.8, frames=4)},
        repeats=3, warmup=1, concurrency_requests=1),
    Preset(
        "sdxl-tiny", "the `ti2i tiny` SDXL models (two text encoders, text-time UNets), 64×64",
        {"sd": _tiny("sdxl"), "pix2pix": _tiny("sdxl_pix2pix"), "inpaint": _tiny("sdxl_inpaint")},
        {"txt2img": Request(64, 64, 10, guidance=5.0),
         "sdedit": Request(64, 64, 10, strength=0.8, guidance=5.0),
         "inpaint": Request(64, 64, 10, strength=1.0, guidance=5.0),
         "pix2pix": Request(64, 64, 8, guidance=5.0)},
        repeats=10, warmup=2, concurrency_requests=12),
    Preset(
        "sdxl-512", "SDXL 1.0 base's UNet, VAE and both text encoders at their real sizes (random weights), "
                    "512×512",
        {"sd": _sdxl},
        {"txt2img": Request(512, 512, 10, guidance=5.0),
         "sdedit": Request(512, 512, 10, strength=0.5, guidance=5.0)},
        repeats=3, warmup=1, concurrency_requests=1),
    Preset(
        "svd-small", "SVD's spatio-temporal UNet, temporal VAE and CLIP vision layouts at 1/5 width, "
                     "8 frames at 128×128",
        {"svd": _svd_small},
        {"svd": Request(128, 128, 4, guidance=3.0, frames=8, decode_chunk_size=4)},
        repeats=3, warmup=1, concurrency_requests=1),
)}


def model_preset(model: str, base: str = "sd15-256") -> Preset:
    """A real model folder: requests as `base` (or tiny's for a tiny-sized folder); the folder is not copied."""
    from ti2i.export.exporter import detect_kind

    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise InvalidInputError(f"--model {model}: not a folder (give a local diffusers model folder)")
    kind = detect_kind(str(path))
    template = PRESETS.get(base) or PRESETS["sd15-256"]
    requests = dict(template.requests)
    if kind == "svd" and "svd" not in requests:
        requests["svd"] = PRESETS["svd-small"].requests["svd"]
    name = f"model-{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    return Preset(name, f"the model folder {path}", {kind: lambda out: None}, requests, template.repeats,
                  template.warmup, template.concurrency_requests, {"model_dir": str(path), "kind": kind})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InvalidInputError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def model_dir(preset: Preset, kind: str, cache: Path, log: Callable[[str], None] = print) -> Path:
    """The diffusers folder of `kind` for the preset, built into the cache the first time."""
    if "model_dir" in preset.extra:
        if kind != preset.extra["kind"]:
            raise InvalidInputError(f"--model is a {preset.extra['kind']!r} model; this method needs a {kind!r} one")
        return Path(preset.extra["model_dir"])
    if kind not in preset.builders:
        raise InvalidInputError(f"preset {preset.name!r} has no {kind!r} model")
    out = cache / preset.name / f"v{BUILD_VERSION}" / "models" / kind
    stamp = out / ".complete"
    if not stamp.is_file():
        import shutil

        if out.exists():
            shutil.rmtree(out)
        log(f"[build] {preset.name}: writing the {kind} model folder to {out}")
        preset.builders[kind](out)
        stamp.write_text("ok\n")
    return out


def engine_dir(preset: Preset, kinds: list[str], cache: Path, log: Callable[[str], None] = print) -> Path:
    """The engine directory holding the kinds' engines (sd and pix2pix share one, as in the tests)."""
    from ti2i.export.exporter import export_model
    from ti2i.manifest import Manifest

    group = "svd" if kinds == ["svd"] else "sd"
    out = cache / preset.name / f"v{BUILD_VERSION}" / "engines" / group
    for kind in kinds:
        have = _exported_kinds(out)
        if kind in have:
            continue
        model = model_dir(preset, kind, cache, log)
        log(f"[export] {preset.name}: exporting {kind} engines to {out} (once; cached)")
        if kind == "videoldm":  # an SD folder and a motion adapter (as `ti2i tiny --kind videoldm` writes)
            export_model(str(model / "sd"), out, log=lambda line: log(f"[export]   {line}"),
                         motion_adapter=str(model / "motion_adapter"))
        else:
            export_model(str(model), out, log=lambda line: log(f"[export]   {line}"))
    return Path(Manifest.load(out).root)


def _exported_kinds(root: Path) -> list[str]:
    path = root / "manifest.json"
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("sources", {}))
    except (json.JSONDecodeError, OSError):
        return []
