"""ControlNet (`ti2i export --controlnet DIR`): txt2img, sdedit and inpaint with a control image equal diffusers'
StableDiffusionControlNetPipeline, ...Img2ImgPipeline and ...InpaintPipeline seed for seed, in-process and served.

The ControlNet is a tiny random one made from the tiny SD UNet (`write_random_controlnet`: its zero convolutions
random, so that the control image matters); the control image is the user's own map, here any picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_abs
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from ti2i.app.cli import main
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.inpaint import inpaint
from ti2i.client.methods import components_for
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.txt2img import txt2img
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_random_controlnet
from ti2i.manifest import Manifest
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] image (the bound)
SIZE = (64, 48)  # width, height


@pytest.fixture(scope="module")
def controlnet(sd_model, tmp_path_factory) -> Path:
    return write_random_controlnet(sd_model, tmp_path_factory.mktemp("controlnets") / "tiny-canny", seed=3)


@pytest.fixture(scope="module")
def controlled(sd_model, inpaint_model, controlnet, tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("controlled") / "engines"
    export_model(str(sd_model), root, log=lambda _: None, controlnets=[str(controlnet)])
    return export_model(str(inpaint_model), root, log=lambda _: None, controlnets=[str(controlnet)])


@pytest.fixture(scope="module")
def control_image(example_image) -> Image.Image:
    return example_image.transpose(Image.FLIP_LEFT_RIGHT)  # any picture stands for the user's map


def _pipeline(cls, model: Path, controlnet: Path):
    base = StableDiffusionPipeline if cls is not StableDiffusionControlNetInpaintPipeline \
        else StableDiffusionInpaintPipeline
    components = base.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False).components
    pipe = cls(**components, controlnet=ControlNetModel.from_pretrained(str(controlnet)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_export_adds_the_controlnet_and_the_unet_that_takes_its_residuals(controlled):
    assert controlled.pipeline["controlnets"] == ["tiny_canny"]
    for name in ("controlnet_tiny_canny", "unet_control", "unet_inpaint_control"):
        assert name in controlled.components, name
    residuals = [t.name for t in controlled.components["controlnet_tiny_canny"].spec.outputs]
    assert residuals == ["down_0", "down_1", "down_2", "down_3", "mid"]  # the tiny UNet's skips and mid block
    inputs = [t.name for t in controlled.components["unet_control"].spec.inputs]
    assert inputs[3:3 + len(residuals)] == residuals


def test_txt2img_with_a_control_image_matches_diffusers(controlled, sd_model, controlnet, control_image):
    pipe = _pipeline(StableDiffusionControlNetPipeline, sd_model, controlnet)
    expected = pipe("a cat", image=control_image, num_inference_steps=4, generator=_generator(3), output_type="np",
                    controlnet_conditioning_scale=0.7, control_guidance_start=0.2,
                    control_guidance_end=0.8).images[0]
    with InProcessRunner(controlled.root) as runner:
        got = txt2img(runner, "a cat", steps=4, seed=3, progress=False, control_image=control_image,
                      control_scale=0.7, control_start=0.2, control_end=0.8)
        plain = txt2img(runner, "a cat", steps=4, seed=3, progress=False, height=SIZE[1], width=SIZE[0])
    assert got.image.size == SIZE  # the control image's size when none is asked for, as the reference
    assert max_abs(got.array, expected) <= TOLERANCE
    assert max_abs(plain.array, expected) > 10 * TOLERANCE  # the ControlNet matters


def test_sdedit_with_a_control_image_matches_diffusers(controlled, sd_model, controlnet, example_image,
                                                       control_image):
    pipe = _pipeline(StableDiffusionControlNetImg2ImgPipeline, sd_model, controlnet)
    expected = pipe("a watercolor", image=example_image, control_image=control_image, strength=0.6,
                    num_inference_steps=5, generator=_generator(4), output_type="np").images[0]
    with InProcessRunner(controlled.root) as runner:
        got = sdedit(runner, example_image, "a watercolor", strength=0.6, steps=5, seed=4, progress=False,
                     control_image=control_image)
    assert max_abs(got.array, expected) <= TOLERANCE


def test_inpaint_with_a_control_image_matches_diffusers(controlled, inpaint_model, controlnet, example_image,
                                                        control_image):
    mask = centered_ellipse_mask(example_image.size)
    pipe = _pipeline(StableDiffusionControlNetInpaintPipeline, inpaint_model, controlnet)
    expected = pipe("a cat", image=example_image, mask_image=mask, control_image=control_image, height=SIZE[1],
                    width=SIZE[0], num_inference_steps=4, generator=_generator(5), output_type="np").images[0]
    with InProcessRunner(controlled.root) as runner:
        got = inpaint(runner, example_image, mask, "a cat", steps=4, seed=5, height=SIZE[1], width=SIZE[0],
                      progress=False, control_image=control_image)
    assert max_abs(got.array, expected) <= TOLERANCE


def test_a_served_request_with_a_control_image_equals_the_in_process_one(controlled, control_image, tmp_path):
    repository = write_repository(controlled, tmp_path / "repository",
                                  models=components_for(["txt2img"], controlled.components),
                                  methods=["txt2img"], core_options=CoreOptions())
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        served = run_remote(f"grpc://{server.grpc_url}", METHODS["txt2img"], progress=False, prompt="a cat",
                            steps=3, seed=2, control_image=control_image, control_scale=0.9)
        with pytest.raises(InvalidInputError, match="control image"):
            run_remote(f"http://{server.http_url}", METHODS["txt2img"], progress=False, prompt="a cat", steps=2,
                       control_image=b"\x89PNG\r\n\x1a\n not really a png")
    with InProcessRunner(controlled.root) as runner:
        local = txt2img(runner, "a cat", steps=3, seed=2, progress=False, control_image=control_image,
                        control_scale=0.9)
    assert max_abs(np.asarray(served.image) / 255.0, local.array) <= 1 / 255 + 1e-6


def test_bad_control_inputs_are_one_clear_error(controlled, engines, example_image, control_image, tmp_path,
                                                capsys):
    wrong_size = control_image.resize((40, 40))
    with InProcessRunner(controlled.root) as runner:
        with pytest.raises(InvalidInputError, match="control image is 40×40"):
            sdedit(runner, example_image, "x", steps=2, progress=False, control_image=wrong_size)
        with pytest.raises(InvalidInputError, match="unknown ControlNet 'depth'.*tiny_canny"):
            txt2img(runner, "x", steps=2, progress=False, control_image=control_image, controlnet="depth")
        with pytest.raises(InvalidInputError, match="control start and end"):
            txt2img(runner, "x", steps=2, progress=False, control_image=control_image, control_start=0.9,
                    control_end=0.1)
    with InProcessRunner(engines.root) as runner, pytest.raises(ModelNotFoundError, match="no ControlNet"):
        txt2img(runner, "x", steps=2, progress=False, control_image=control_image)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out.png"
    assert main(["txt2img", "--engines", str(controlled.root), "--prompt", "x", "--steps", "2", "--quiet",
                 "--control-image", str(corrupt), "--out", str(out)]) == 2
    assert "control image" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--model", str(tmp_path / "svd"), "--out", str(tmp_path / "e"), "--controlnet",
                 str(tmp_path / "missing")]) == 2


def test_a_controlnet_is_calibrated_at_consistent_sizes(controlled):
    """Memory calibration runs a ControlNet with its image at the latent size × 8 and the UNet taking its
    residuals with them at their downsampled sizes (with the image at its minimum, SD 1.5's ControlNet was
    fitted to a floor and predicted 30 GiB for a 256² request, refusing it)."""
    from ti2i.engines.calibrate import _sizes, layout

    spec = controlled.components["controlnet_tiny_canny"].spec
    sizes = _sizes(spec, layout(spec), 20, 1, 2)
    assert (sizes["height"], sizes["image_height"], sizes["image_width"]) == (20, 160, 160)
    spec = controlled.components["unet_control"].spec
    assert _sizes(spec, layout(spec), 21, 1, 2)["height/2"] == 11
