"""The tiny random-weight model folders load in the real diffusers pipelines and behave sanely."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
)
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from ti2i.errors import InvalidInputError
from ti2i.export.tiny import TINY_KINDS, write_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"
PIPELINES: dict[str, type[DiffusionPipeline]] = {
    "sd": StableDiffusionImg2ImgPipeline,
    "pix2pix": StableDiffusionInstructPix2PixPipeline,
}


@pytest.fixture(scope="module", params=TINY_KINDS)
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
    with pytest.raises(InvalidInputError, match="sd.*pix2pix"):
        write_tiny_model("sdxl", tmp_path)


def test_example_image() -> None:
    with Image.open(EXAMPLE) as image:
        assert image.size == (256, 256) and image.mode == "RGB"
