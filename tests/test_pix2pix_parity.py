"""InstructPix2Pix matches diffusers' StableDiffusionInstructPix2PixPipeline seed for seed."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs, served_and_local
from diffusers import StableDiffusionInstructPix2PixPipeline
from ti2i.client.pix2pix import pix2pix
from ti2i.client.runners import InProcessRunner

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference(pix2pix_model):
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(pix2pix_model), safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "three_way_guidance": dict(prompt="make it snowy", guidance=7.5, image_guidance=1.5),
    "negative_prompt": dict(prompt="make it snowy", negative_prompt="blurry", guidance=5.0, image_guidance=1.2),
    "empty_instruction": dict(prompt="", guidance=7.5, image_guidance=1.5),
    "guidance_off_by_text_scale": dict(prompt="make it snowy", guidance=1.0, image_guidance=1.5),
    "guidance_off_by_image_scale": dict(prompt="make it snowy", guidance=7.5, image_guidance=0.5),
}


def run_reference(pipe, image, seed, steps, prompt, guidance, image_guidance, negative_prompt=None):
    return pipe(prompt, image=image, negative_prompt=negative_prompt, num_inference_steps=steps,
                guidance_scale=guidance, image_guidance_scale=image_guidance,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, engines, example_image):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, 7, 10, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = pix2pix(runner, example_image, seed=7, steps=10, progress=False, **kwargs)
    assert got.array.shape == expected.shape == (48, 64, 3)
    assert max_abs(got.array, expected) <= TOLERANCE


def test_each_unet_keeps_the_scheduler_its_model_folder_ships(engines):
    assert engines.pipeline["unets"]["unet_pix2pix"]["scheduler"]["_class_name"] == "EulerAncestralDiscreteScheduler"
    assert engines.pipeline["unets"]["unet"]["scheduler"]["_class_name"] == "PNDMScheduler"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, engines, triton_server, example_image):
    kwargs = CASES["three_way_guidance"]
    expected = run_reference(reference, example_image, 11, 8, **kwargs)
    served, local = served_and_local(triton_server, protocol, engines.root, lambda runner: pix2pix(
        runner, example_image, seed=11, steps=8, progress=False, **kwargs))
    assert max_abs(served.array, expected) <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5
