"""CycleDiffusion matches diffusers' CycleDiffusionPipeline, and its DPM-Encoder code reconstructs the input."""

from __future__ import annotations

import pytest
import torch
from conftest import max_abs, served_and_local
from diffusers import CycleDiffusionPipeline, DDIMScheduler
from ti2i.client import steps as shared
from ti2i.client.cyclediffusion import cyclediffusion
from ti2i.client.images import prepare_image
from ti2i.client.runners import InProcessRunner

from ti2i.errors import InvalidInputError

TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference(sd_model):
    pipe = CycleDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "guided": dict(prompt="a dog", source_prompt="a cat", strength=0.8, guidance=7.5, source_guidance=1.0, eta=0.1),
    "guided_source_too": dict(prompt="a dog", source_prompt="a cat", strength=0.6, guidance=3.0,
                              source_guidance=2.0, eta=0.3),
    "unguided": dict(prompt="a dog", source_prompt="a cat", strength=1.0, guidance=1.0, source_guidance=1.0, eta=0.1),
}


def run_reference(pipe, image, seed, steps, prompt, source_prompt, strength, guidance, source_guidance, eta):
    return pipe(prompt=prompt, source_prompt=source_prompt, image=image, strength=strength,
                num_inference_steps=steps, guidance_scale=guidance, source_guidance_scale=source_guidance, eta=eta,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, engines, example_image):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, 2, 10, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = cyclediffusion(runner, example_image, seed=2, steps=10, progress=False, **kwargs)
    assert max_abs(got.array, expected) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, engines, triton_server, example_image):
    kwargs = CASES["guided"]
    expected = run_reference(reference, example_image, 9, 10, **kwargs)
    served, local = served_and_local(triton_server, protocol, engines.root, lambda runner: cyclediffusion(
        runner, example_image, seed=9, steps=10, progress=False, **kwargs))
    assert max_abs(served.array, expected) <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_decoding_the_code_under_the_source_prompt_reconstructs_the_input(guidance, engines, example_image):
    """Target prompt = source prompt and equal guidance: the chains coincide and end on x_0 exactly."""
    seed = 4
    with InProcessRunner(engines.root) as runner:
        result = cyclediffusion(runner, example_image, "a cat", "a cat", strength=0.8, steps=12, guidance=guidance,
                                source_guidance=guidance, eta=0.1, seed=seed, progress=False)
        pixels = prepare_image(example_image, None, None, runner.pipeline["vae_scale_factor"])
        mean, logvar = shared.encode_image(runner, pixels)
        x0 = runner.pipeline["vae_scaling_factor"] * shared.sample_posterior(
            mean, logvar, torch.Generator("cpu").manual_seed(seed))
    error = (result.latents - x0).abs().max().item()
    assert error <= 1e-4 * max(1.0, x0.abs().max().item())
    # a different target prompt does not reconstruct it
    with InProcessRunner(engines.root) as runner:
        edited = cyclediffusion(runner, example_image, "a dog", "a cat", strength=0.8, steps=12, guidance=guidance,
                                source_guidance=guidance, eta=0.1, seed=seed, progress=False)
    assert (edited.latents - x0).abs().max().item() > 100 * error


@pytest.mark.parametrize("eta", [0.0, -0.1])
def test_eta_must_be_positive(eta, engines, example_image):
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError, match="eta"):
        cyclediffusion(runner, example_image, "a dog", "a cat", eta=eta, steps=4, progress=False)


def test_missing_source_prompt_is_a_clear_error(engines, example_image):
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError, match="source prompt"):
        cyclediffusion(runner, example_image, "a dog", None, steps=4, progress=False)
