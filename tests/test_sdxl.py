"""SDXL text-to-image and SDEdit match diffusers' StableDiffusionXL pipelines seed for seed, in-process and served
as whole methods by a real Triton, on a tiny random SDXL model (two text encoders, text-time UNet)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs, server_url
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.errors import InvalidInputError
from ti2i.export.exporter import detect_kind, export_model
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.method_repository import servable_methods
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] float image
SERVED = 1 / 255  # served against in-process


@pytest.fixture(scope="module")
def references(sdxl_model):
    text = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))
    image = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_model))
    for pipe in (text, image):
        pipe.set_progress_bar_config(disable=True)
        assert pipe.watermark is None  # no invisible-watermark here: the outputs compare as they are
    return {"txt2img": text, "sdedit": image}


def _expected(pipe, seed: int, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]


TXT2IMG = {  # (ours, diffusers')
    "empty_negative_is_zeros": (dict(prompt="a cat", steps=4, guidance=5.0, height=64, width=48),
                                dict(prompt="a cat", num_inference_steps=4, guidance_scale=5.0, height=64, width=48)),
    "negative": (dict(prompt="a dog", negative_prompt="blurry", steps=3, guidance=7.0, height=48, width=64),
                 dict(prompt="a dog", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0,
                      height=48, width=64)),
    "no_guidance": (dict(prompt="hills", steps=3, guidance=1.0, height=32, width=32),
                    dict(prompt="hills", num_inference_steps=3, guidance_scale=1.0, height=32, width=32)),
}
SDEDIT = (dict(prompt="a photo of a dog", strength=0.6, steps=5, guidance=5.0),
          dict(prompt="a photo of a dog", strength=0.6, num_inference_steps=5, guidance_scale=5.0))


def test_an_sdxl_folder_exports_as_sdxl(sdxl_model, sdxl_engines):
    assert detect_kind(str(sdxl_model)) == "sdxl"
    spec = sdxl_engines.components["unet"].spec
    assert [t.name for t in spec.inputs][3:5] == ["text_embeds", "time_ids"]
    assert sdxl_engines.components["unet"].declared_as == "unet_xl"
    assert {"tokenize", "tokenize_2"} <= set(sdxl_engines.components)
    text = sdxl_engines.components["text_encoder"].spec
    assert [t.name for t in text.outputs] == ["text_embeddings", "text_embeds"]
    assert text.outputs[0].shape[-1] == 32 + 48  # both encoders' widths, concatenated
    assert servable_methods(sdxl_engines.components) == ["txt2img", "sdedit"]


@pytest.mark.parametrize("case", sorted(TXT2IMG))
def test_txt2img_matches_diffusers(case, references, sdxl_engines):
    ours, theirs = TXT2IMG[case]
    expected = _expected(references["txt2img"], 3, **theirs)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["txt2img"](runner, seed=3, **ours)
    assert got.array.shape == expected.shape
    assert max_abs(got.array, expected) <= TOLERANCE


def test_sdedit_matches_diffusers(references, sdxl_engines, example_image):
    ours, theirs = SDEDIT
    expected = _expected(references["sdedit"], 4, image=example_image, **theirs)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["sdedit"](runner, image=example_image, seed=4, **ours)
    assert got.array.shape == expected.shape == (48, 64, 3)
    assert max_abs(got.array, expected) <= TOLERANCE


def test_a_method_not_written_for_sdxl_is_one_clear_error(sdxl_engines, example_image):
    with InProcessRunner(sdxl_engines.root) as runner:
        with pytest.raises(InvalidInputError, match="cyclediffusion does not run on an SDXL model"):
            METHODS["cyclediffusion"](runner, image=example_image, source_prompt="a", prompt="b", steps=2)
    with pytest.raises(InvalidInputError, match="ddib does not run on the SDXL models"):
        write_repository(sdxl_engines, sdxl_engines.root.parent / "refused", methods=["ddib"],
                         core_options=CoreOptions())


def test_an_sdxl_refiner_is_refused_at_export(sdxl_model, tmp_path):
    """A refiner has one text encoder (the second): refused with what ti2i exports, not a traceback."""
    import json
    import shutil

    refiner = tmp_path / "refiner"
    shutil.copytree(sdxl_model, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidInputError, match="SDXL refiner"):
        export_model(str(refiner), tmp_path / "engines", log=lambda _: None)


@pytest.fixture(scope="module")
def sdxl_server(sdxl_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-served")
    repository = write_repository(sdxl_engines, root / "repository", methods=servable_methods(sdxl_engines.components),
                                  core_options=CoreOptions(active=2))
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


def test_served_methods_equal_in_process(sdxl_server, sdxl_engines, example_image):
    """txt2img and sdedit as whole method models (gRPC, streamed; HTTP), equal to the in-process loops."""
    calls = {"txt2img": dict(TXT2IMG["negative"][0], seed=5),
             "sdedit": dict(SDEDIT[0], image=example_image, seed=6)}
    with InProcessRunner(sdxl_engines.root) as runner:
        local = {name: METHODS[name](runner, **values) for name, values in calls.items()}
    for name, values in calls.items():
        grpc = run_remote(server_url(sdxl_server, "grpc"), METHODS[name], progress=False, **values)
        http = run_remote(server_url(sdxl_server, "http"), METHODS[name], progress=False, stream=False, **values)
        for served in (grpc, http):
            assert max_abs(np.asarray(served.image) / 255.0, local[name].array) <= SERVED, name
