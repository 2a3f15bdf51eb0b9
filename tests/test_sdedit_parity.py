"""SDEdit matches diffusers' StableDiffusionImg2ImgPipeline seed for seed, in-process and through Triton."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs, served_and_local
from diffusers import StableDiffusionImg2ImgPipeline
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit

TOLERANCE = 1e-3  # max |Δ| on the [0, 1] float image


@pytest.fixture(scope="module")
def reference(sd_model):
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(sd_model), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, image, seed=0, **kwargs) -> np.ndarray:
    out = pipe(image=image, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs)
    return out.images[0]


CASES = {
    "defaults": dict(prompt="a photo of a cat", strength=0.8, num_inference_steps=12, guidance_scale=7.5),
    "negative": dict(prompt="a photo of a dog", negative_prompt="blurry", strength=0.6,
                     num_inference_steps=10, guidance_scale=5.0),
    "no_guidance": dict(prompt="hills", strength=1.0, num_inference_steps=8, guidance_scale=1.0),
}


def ours(runner, image, seed=0, **kwargs):
    return sdedit(runner, image, kwargs["prompt"], negative_prompt=kwargs.get("negative_prompt"),
                  strength=kwargs["strength"], steps=kwargs["num_inference_steps"],
                  guidance=kwargs["guidance_scale"], seed=seed, progress=False, eta=kwargs.get("eta", 0.0))


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, sd_engines, example_image):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, seed=3, **kwargs)
    with InProcessRunner(sd_engines.root) as runner:
        got = ours(runner, example_image, seed=3, **kwargs)
    assert got.array.shape == expected.shape == (48, 64, 3)
    assert max_abs(got.array, expected) <= TOLERANCE
    # and the seed matters: another seed gives another image
    with InProcessRunner(sd_engines.root) as runner:
        other = ours(runner, example_image, seed=4, **kwargs)
    assert max_abs(other.array, expected) > 10 * TOLERANCE


def test_stochastic_scheduler_consumes_the_generator_like_diffusers(reference, sd_engines, example_image):
    """DDIM with eta > 0 draws noise at every step: the order of draws must match the reference."""
    from diffusers import DDIMScheduler

    original = reference.scheduler
    config = dict(original.config)
    kwargs = dict(prompt="a photo of a cat", strength=0.7, num_inference_steps=10, guidance_scale=7.5, eta=0.5)
    reference.scheduler = DDIMScheduler.from_config(config)
    try:
        expected = run_reference(reference, example_image, seed=1, **kwargs)
    finally:
        reference.scheduler = original
    with InProcessRunner(sd_engines.root) as runner:
        ddim = {"scheduler": {**config, "_class_name": "DDIMScheduler"}}
        runner.pipeline = {**runner.pipeline, "unets": {"unet": ddim}}
        got = ours(runner, example_image, seed=1, **kwargs)
    assert max_abs(got.array, expected) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, sd_engines, triton_server, example_image):
    kwargs = CASES["defaults"]
    expected = run_reference(reference, example_image, seed=5, **kwargs)
    served, local = served_and_local(triton_server, protocol, sd_engines.root, lambda runner: ours(
        runner, example_image, seed=5, **kwargs))
    assert max_abs(served.array, expected) <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5
    assert np.array_equal(np.asarray(served.image), (served.array * 255).round().astype(np.uint8))


def test_height_and_width_resize_like_the_reference(reference, sd_engines, example_image):
    from diffusers.image_processor import VaeImageProcessor

    kwargs = CASES["defaults"]
    resized = VaeImageProcessor(vae_scale_factor=8).resize(example_image, 40, 56)  # 43×61 snapped down
    expected = run_reference(reference, resized, seed=2, **kwargs)
    with InProcessRunner(sd_engines.root) as runner:
        got = sdedit(runner, example_image, kwargs["prompt"], strength=0.8, steps=12, seed=2, height=43, width=61,
                     progress=False)
    assert got.image.size == (56, 40)
    assert max_abs(got.array, expected) <= TOLERANCE
