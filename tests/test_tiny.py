"""The tiny random-weight model folders load in the real diffusers pipelines and behave sanely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AnimateDiffVideoToVideoPipeline,
    AutoencoderKL,
    AutoencoderKLTemporalDecoder,
    MotionAdapter,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetMotionModel,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from ti2i.export.tiny import SVD_EULER_CONFIG, TINY_KINDS, write_tiny_model
from transformers import CLIPTextModel, CLIPTokenizer

from ti2i.errors import InvalidInputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionImg2ImgPipeline,
    "pix2pix": StableDiffusionInstructPix2PixPipeline,
}
IMAGE_KINDS = ("sd", "pix2pix")


@pytest.fixture(scope="module", params=IMAGE_KINDS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind = request.param
    return kind, write_tiny_model(kind, tmp_path_factory.mktemp(kind))


def _load(kind: str, folder: Path) -> DiffusionPipeline:
    pipe = PIPELINES[kind].from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _example(size: int = 64) -> Image.Image:
    with Image.open(EXAMPLE) as example:
        return example.convert("RGB").resize((size, size))


def _run(pipe: DiffusionPipeline, seed: int, image: Image.Image | None = None) -> np.ndarray:
    out = pipe(
        "a photo of a cat",
        image=_example() if image is None else image,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


def test_pipeline_runs_deterministically(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    pipe = _load(kind, folder)
    first, again, other = _run(pipe, 0), _run(pipe, 0), _run(pipe, 1)
    assert first.shape == (1, 64, 64, 3)
    assert first.std() > 0.01
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3
    flipped = _run(pipe, 0, _example().transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    assert np.abs(first - flipped).mean() > 1e-3  # the output depends on the input image


def test_layout_and_configs(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= index.keys()
    assert (folder / "tokenizer" / "vocab.json").is_file()
    assert (folder / "tokenizer" / "merges.txt").is_file()

    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert unet["in_channels"] == (4 if kind == "sd" else 8)
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert unet["cross_attention_dim"] == text["hidden_size"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert vae["scaling_factor"] == 0.18215 and vae["latent_channels"] == 4
    common = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    assert common.items() <= sched.items()
    assert sched["prediction_type"] == "epsilon"
    if kind == "sd":
        assert sched["_class_name"] == "PNDMScheduler"
        sd15 = {"skip_prk_steps": True, "set_alpha_to_one": False, "clip_sample": False}
        assert sd15.items() <= sched.items() and sched["timestep_spacing"] == "leading"
    else:
        assert sched["_class_name"] == "EulerAncestralDiscreteScheduler"


def test_text_to_image_pipeline_loads(tmp_path: Path) -> None:
    folder = write_tiny_model("sd", tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 64, 64, 3)  # unet sample_size 8 x vae_scale_factor 8


def test_tokenizer_round_trip(tiny: tuple[str, Path]) -> None:
    _, folder = tiny
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    ids = tokenizer("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenizer.model_max_length == 77 and len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_same_seed_same_weights(tmp_path: Path) -> None:
    def unet_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        folder = write_tiny_model("sd", tmp_path / name, seed=seed)
        return load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")

    a, b, c = unet_weights("a", 3), unet_weights("b", 3), unet_weights("c", 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_kind_names_allowed_kinds(tmp_path: Path) -> None:
    import argparse

    from ti2i.app.cli import build_parser

    with pytest.raises(InvalidInputError, match="unknown tiny model kind 'sd3'") as err:
        write_tiny_model("sd3", tmp_path)
    assert all(kind in str(err.value) for kind in TINY_KINDS)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    kind_help = next(a.help for a in sub.choices["tiny"]._actions if "--kind" in a.option_strings)
    assert all(kind in kind_help.replace(",", " ").split() for kind in TINY_KINDS)  # `ti2i tiny --help` names each


def test_inpaint_shares_the_sd_text_encoder_and_vae(tmp_path: Path) -> None:
    """Same seed: the 9-channel UNet is drawn last, so the inpainting folder can join SD's engine directory."""
    sd, inpaint = write_tiny_model("sd", tmp_path / "sd"), write_tiny_model("inpaint", tmp_path / "inpaint")
    for weights in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(sd / weights), load_file(inpaint / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights
    assert (sd / "tokenizer" / "vocab.json").read_bytes() == (inpaint / "tokenizer" / "vocab.json").read_bytes()
    index = json.loads((inpaint / "model_index.json").read_text())
    unet = json.loads((inpaint / "unet" / "config.json").read_text())
    sched = json.loads((inpaint / "scheduler" / "scheduler_config.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert unet["in_channels"] == 9 and unet["out_channels"] == 4 and unet["sample_size"] == 8
    assert sched["_class_name"] == "DDIMScheduler" and sched["steps_offset"] == 1 and not sched["set_alpha_to_one"]

    pipe = StableDiffusionInpaintPipeline.from_pretrained(inpaint, safety_checker=None,
                                                          requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 16, 40, 48))  # off-centre, so its mirror image is another mask

    def run(seed: int, mask_image: Image.Image) -> np.ndarray:
        return pipe("a cat", image=_example(), mask_image=mask_image, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(seed), output_type="np").images

    first, again, other = run(0, mask), run(0, mask), run(1, mask)
    assert first.shape == (1, 64, 64, 3) and first.std() > 0.01
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3
    assert np.abs(first - run(0, mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT))).mean() > 1e-3


def test_example_image() -> None:
    with Image.open(EXAMPLE) as image:
        assert image.size == (256, 256) and image.mode == "RGB"


# --- Stable Video Diffusion ("svd") ----------------------------------------------------------


@pytest.fixture(scope="module")
def svd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("svd", tmp_path_factory.mktemp("svd"))


@pytest.fixture(scope="module")
def svd_pipe(svd: Path) -> StableVideoDiffusionPipeline:
    pipe = StableVideoDiffusionPipeline.from_pretrained(svd, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run_svd(pipe: StableVideoDiffusionPipeline, seed: int, image: Image.Image | None = None) -> np.ndarray:
    image = _example() if image is None else image
    out = pipe(
        image,
        height=image.height,  # the pipeline defaults to 576x1024, not to the UNet's sample_size
        width=image.width,
        num_frames=4,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.frames


def test_svd_pipeline_runs_deterministically(svd_pipe: StableVideoDiffusionPipeline) -> None:
    first, again, other = _run_svd(svd_pipe, 0), _run_svd(svd_pipe, 0), _run_svd(svd_pipe, 1)
    assert first.shape == (1, 4, 64, 64, 3)
    assert first.std() > 0.01
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3  # varies with the seed
    assert np.abs(first[:, 1:] - first[:, :-1]).mean() > 1e-3  # the frames are not all alike
    flipped = _run_svd(svd_pipe, 0, _example().transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    assert np.abs(first - flipped).mean() > 1e-3  # the output depends on the input image
    wide = _run_svd(svd_pipe, 0, _example().resize((64, 48)))
    assert wide.shape == (1, 4, 48, 64, 3)


def test_svd_layout_and_configs(svd: Path) -> None:
    def config(name: str) -> dict:
        return json.loads((svd / name).read_text())

    index = config("model_index.json")
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    assert {"unet", "vae", "image_encoder", "feature_extractor", "scheduler"} <= index.keys()
    unet, vae = config("unet/config.json"), config("vae/config.json")
    encoder, sched = config("image_encoder/config.json"), config("scheduler/scheduler_config.json")
    features = config("feature_extractor/preprocessor_config.json")
    assert unet["in_channels"] == 8 and unet["out_channels"] == 4 and unet["num_frames"] == 8
    assert unet["projection_class_embeddings_input_dim"] == 3 * unet["addition_time_embed_dim"]
    assert unet["cross_attention_dim"] == encoder["projection_dim"]
    assert 2 ** (len(vae["block_out_channels"]) - 1) == 8
    assert vae["scaling_factor"] == 0.18215 and vae["latent_channels"] == 4
    assert encoder["image_size"] == 224
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert SVD_EULER_CONFIG.items() <= sched.items()
    assert sched["use_karras_sigmas"] and sched["timestep_type"] == "continuous"
    assert (sched["sigma_min"], sched["sigma_max"], sched["prediction_type"]) == (0.002, 700.0, "v_prediction")
    assert features["image_mean"] == [0.48145466, 0.4578275, 0.40821073]
    assert features["image_std"] == [0.26862954, 0.26130258, 0.27577711]
    assert features["crop_size"] == {"height": 224, "width": 224} and features["size"] == {"shortest_edge": 224}


@torch.no_grad()
def test_svd_vae_encodes_the_image_and_decodes_over_time(svd: Path) -> None:
    vae = AutoencoderKLTemporalDecoder.from_pretrained(svd / "vae", local_files_only=True).eval()
    pixels = torch.from_numpy(np.asarray(_example(), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    posterior = vae.encode(pixels).latent_dist
    # SVD feeds the unscaled posterior mode to its UNet: SD-like statistics, near-deterministic.
    assert 0.3 < float(posterior.mode().std() * vae.config.scaling_factor) < 3.0
    assert float(posterior.std.max()) < 0.1 * float(posterior.mode().std())
    flipped = vae.encode(pixels.flip(2)).latent_dist.mode()
    assert float((posterior.mode() - flipped).abs().mean()) > 0.1 * float(posterior.mode().abs().mean())

    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / vae.config.scaling_factor
    frames = vae.decode(latents, num_frames=4).sample
    assert frames.shape == (4, 3, 64, 64) and float(frames.std()) > 0.05
    changed = latents.clone()
    changed[0] = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1)) / vae.config.scaling_factor
    other = vae.decode(changed, num_frames=4).sample
    assert float((frames[0] - other[0]).abs().mean()) > 0.05  # the output follows the latents
    assert float((frames[1] - other[1]).abs().mean()) > 1e-3  # and the temporal layers mix frames


# --- Video LDM / AnimateDiff ("videoldm") ------------------------------------------------------


@pytest.fixture(scope="module")
def videoldm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model("videoldm", tmp_path_factory.mktemp("videoldm"))


@pytest.fixture(scope="module")
def motion_unets(videoldm: Path) -> tuple[UNet2DConditionModel, UNetMotionModel, MotionAdapter]:
    unet = UNet2DConditionModel.from_pretrained(videoldm / "sd" / "unet", local_files_only=True).eval()
    adapter = MotionAdapter.from_pretrained(videoldm / "motion_adapter", local_files_only=True).eval()
    return unet, UNetMotionModel.from_unet2d(unet, adapter).eval(), adapter


def test_videoldm_layout(videoldm: Path, tmp_path: Path) -> None:
    sd = write_tiny_model("sd", tmp_path / "sd")
    files = sorted(p.relative_to(sd) for p in sd.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(videoldm / "sd") for p in (videoldm / "sd").rglob("*") if p.is_file())
    assert all((sd / f).read_bytes() == (videoldm / "sd" / f).read_bytes() for f in files)  # exactly "sd"

    unet = json.loads((sd / "unet" / "config.json").read_text())
    adapter = json.loads((videoldm / "motion_adapter" / "config.json").read_text())
    assert adapter["_class_name"] == "MotionAdapter"
    assert adapter["block_out_channels"] == unet["block_out_channels"]
    assert adapter["motion_layers_per_block"] == unet["layers_per_block"]
    assert adapter["motion_norm_num_groups"] == unet["norm_num_groups"]
    assert all(c % adapter["motion_num_attention_heads"] == 0 for c in unet["block_out_channels"])
    assert adapter["motion_max_seq_length"] >= 32 and adapter["use_motion_mid_block"]
    weights = load_file(videoldm / "motion_adapter" / "diffusion_pytorch_model.safetensors")
    proj_out = [v for k, v in weights.items() if k.endswith("proj_out.weight")]
    assert proj_out and all(float(w.abs().max()) > 0 for w in proj_out)  # not AnimateDiff's zero init


def test_videoldm_video_to_video_pipeline_runs(videoldm: Path, motion_unets) -> None:
    _, motion_unet, adapter = motion_unets
    sd = videoldm / "sd"
    pipe = AnimateDiffVideoToVideoPipeline(
        vae=AutoencoderKL.from_pretrained(sd / "vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(sd / "text_encoder", local_files_only=True),
        tokenizer=CLIPTokenizer.from_pretrained(sd / "tokenizer", local_files_only=True),
        unet=motion_unet,
        motion_adapter=adapter,
        scheduler=PNDMScheduler.from_pretrained(sd / "scheduler", local_files_only=True),
    )
    pipe.set_progress_bar_config(disable=True)
    video = [_example().rotate(10 * i) for i in range(4)]

    def run(seed: int) -> np.ndarray:
        out = pipe(
            video=video,
            prompt="a photo of a cat",
            num_inference_steps=2,
            strength=1.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        )
        return out.frames

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (1, 4, 64, 64, 3)
    assert first.std() > 0.01
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 1e-3


@torch.no_grad()
def test_motion_layers_change_the_output(motion_unets) -> None:
    unet, motion_unet, _ = motion_unets
    gen = torch.Generator().manual_seed(0)
    frames = 4
    latents = torch.randn(1, 4, frames, 8, 8, generator=gen)  # (batch, channels, frames, h, w)
    text = torch.randn(frames, 77, 32, generator=gen)  # the prompt embedding, repeated per frame

    def per_frame(x: torch.Tensor) -> torch.Tensor:
        out = unet(x[0].permute(1, 0, 2, 3), 500, encoder_hidden_states=text).sample
        return out.permute(1, 0, 2, 3)[None]

    def motion(x: torch.Tensor) -> torch.Tensor:
        return motion_unet(x, 500, encoder_hidden_states=text).sample

    image_out, motion_out = per_frame(latents), motion(latents)
    assert motion_out.shape == image_out.shape
    assert float((motion_out - image_out).abs().mean() / image_out.abs().mean()) > 1e-2

    changed = latents.clone()
    changed[:, :, 0] = torch.randn(1, 4, 8, 8, generator=gen)
    # Frame 3 of the image UNet ignores frame 0; the motion UNet's temporal attention does not.
    torch.testing.assert_close(per_frame(changed)[:, :, 3], image_out[:, :, 3])
    moved = motion(changed)[:, :, 3] - motion_out[:, :, 3]
    assert float(moved.abs().mean() / motion_out[:, :, 3].abs().mean()) > 1e-2


def test_video_kinds_same_seed_same_weights(tmp_path: Path) -> None:
    def weights(kind: str, name: str, seed: int) -> dict[str, torch.Tensor]:
        folder = write_tiny_model(kind, tmp_path / name, seed=seed)
        sub = "unet" if kind == "svd" else "motion_adapter"
        return load_file(folder / sub / "diffusion_pytorch_model.safetensors")

    for kind in ("svd", "videoldm"):
        a, b, c = weights(kind, f"{kind}-a", 3), weights(kind, f"{kind}-b", 3), weights(kind, f"{kind}-c", 4)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert not all(torch.equal(a[k], c[k]) for k in a)
