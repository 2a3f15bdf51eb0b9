"""Video LDM: the α-merged temporal UNet reduces to the image UNet at α = 1, matches AnimateDiff at α = 0,
and anchoring keeps frame 0 on the input image."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, max_abs, server_url
from diffusers import (
    AnimateDiffVideoToVideoPipeline,
    DDIMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    UNetMotionModel,
)
from ti2i.client import steps as shared
from ti2i.client.images import prepare_image
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.client.videoldm import LINEAR_DDIM, videoldm

from ti2i.errors import InvalidInputError

TOLERANCE = 1e-3
SIZE = dict(height=48, width=64)


def unet_calls(runner, frames: int, alpha: float, seed: int = 0):
    """The temporal UNet on F frames, and the image UNet on each frame alone, for the same inputs."""
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 4, frames, 6, 8)).astype(np.float32)
    timestep = np.array([500.0, 500.0], np.float32)
    embeds = rng.standard_normal((2, 77, 32)).astype(np.float32)
    video = runner.run("unet_motion", sample=sample, timestep=timestep, encoder_hidden_states=embeds,
                       alpha=np.full(2, alpha, np.float32))["noise_pred"]
    per_frame = np.stack([runner.run("unet", sample=np.ascontiguousarray(sample[:, :, f]), timestep=timestep,
                                     encoder_hidden_states=embeds)["noise_pred"] for f in range(frames)], axis=2)
    return video, per_frame


def test_alpha_one_gives_back_the_image_unet_per_frame(engines):
    with InProcessRunner(engines.root) as runner:
        video, per_frame = unet_calls(runner, frames=4, alpha=1.0)
        trained, _ = unet_calls(runner, frames=4, alpha=0.0)
    assert max_abs(video, per_frame) <= 1e-4
    # the temporal layers do act when α < 1 (so the α = 1 result is not vacuous)
    assert max_abs(trained, per_frame) > 1e-2


def test_alpha_one_through_triton(engines, triton_server):
    with TritonRunner(f"grpc://{triton_server.grpc_url}") as runner:
        video, per_frame = unet_calls(runner, frames=3, alpha=1.0, seed=1)
    assert max_abs(video, per_frame) <= 1e-4


def test_alpha_is_a_runtime_input_interpolating_the_merge(engines):
    """Each temporal layer's output is α·input + (1 − α)·output: α changes the result without a rebuild."""
    with InProcessRunner(engines.root) as runner:
        outputs = [unet_calls(runner, frames=3, alpha=a, seed=2)[0] for a in (0.0, 0.5, 1.0)]
    assert max_abs(outputs[0], outputs[1]) > 1e-3 and max_abs(outputs[1], outputs[2]) > 1e-3


@pytest.fixture(scope="module")
def reference(sd_model, motion_adapter):
    sd = StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None, requires_safety_checker=False)
    adapter = MotionAdapter.from_pretrained(str(motion_adapter))
    pipe = AnimateDiffVideoToVideoPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                           unet=UNetMotionModel.from_unet2d(sd.unet, adapter),
                                           motion_adapter=adapter, scheduler=sd.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, image, seed, frames, steps, prompt, strength, guidance, scheduler="model",
                  negative_prompt=None):
    original = pipe.scheduler
    if scheduler == "linear-ddim":
        pipe.scheduler = DDIMScheduler.from_config(original.config, **LINEAR_DDIM)
    try:
        return pipe(video=[image] * frames, prompt=prompt, negative_prompt=negative_prompt, strength=strength,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(seed), **SIZE).frames[0]
    finally:
        pipe.scheduler = original


CASES = {
    "model_scheduler": dict(prompt="a cat", strength=0.8, guidance=7.5),
    "linear_ddim": dict(prompt="a cat", strength=0.6, guidance=5.0, scheduler="linear-ddim", negative_prompt="blur"),
    "no_guidance": dict(prompt="a cat", strength=1.0, guidance=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_alpha_zero_without_anchor_matches_animatediff(case, reference, engines, example_image):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, 5, 4, 8, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = videoldm(runner, example_image, frames=4, steps=8, alpha=0.0, anchor_first_frame=False, seed=5,
                       progress=False, **SIZE, **kwargs)
    assert got.array.shape == expected.shape == (4, 48, 64, 3)
    assert max_abs(got.array, expected) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_alpha_zero_through_triton_matches_animatediff(protocol, reference, engines, triton_server, example_image):
    kwargs = CASES["model_scheduler"]
    expected = run_reference(reference, example_image, 6, 4, 8, **kwargs)
    url = server_url(triton_server, protocol)
    with TritonRunner(url) as runner:
        served = videoldm(runner, example_image, frames=4, steps=8, anchor_first_frame=False, seed=6,
                          progress=False, **SIZE, **kwargs)
    assert max_abs(served.array, expected) <= TOLERANCE


def test_anchoring_ends_frame_zero_exactly_on_the_input_latent(engines, example_image):
    seed = 7
    with InProcessRunner(engines.root) as runner:
        result = videoldm(runner, example_image, "a cat", frames=4, steps=8, seed=seed, progress=False, **SIZE)
        free = videoldm(runner, example_image, "a cat", frames=4, steps=8, seed=seed, anchor_first_frame=False,
                        progress=False, **SIZE)
        pixels = prepare_image(example_image, None, None, runner.pipeline["vae_scale_factor"])
        mean, logvar = shared.encode_image(runner, pixels)
    generator = torch.Generator("cpu").manual_seed(seed)
    clean = runner.pipeline["vae_scaling_factor"] * shared.sample_posterior(
        mean.expand(4, -1, -1, -1), logvar.expand(4, -1, -1, -1), generator)
    assert torch.equal(result.latents[0, :, 0], clean[0])
    assert not torch.equal(free.latents[0, :, 0], clean[0])
    assert result.frames.shape == (4, 48, 64, 3)


@pytest.mark.parametrize("bad, words", [
    (dict(frames=1), "frames"), (dict(frames=33), "frames"), (dict(alpha=-0.1), "alpha"), (dict(alpha=1.5), "alpha"),
    (dict(strength=0.0), "strength"), (dict(steps=0), "steps"), (dict(scheduler="warp-drive"), "scheduler"),
    (dict(fps=0), "fps"),
])
def test_bad_input_is_a_clear_error(bad, words, engines, example_image):
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError, match=words):
        videoldm(runner, example_image, "a cat", progress=False, **{"frames": 4, "steps": 2, **SIZE, **bad})


def test_cli_bad_input_exits_2_and_the_server_stays_up(triton_server, tmp_path):
    base = [sys.executable, "-m", "ti2i.client.cli", "videoldm", "--server", f"grpc://{triton_server.grpc_url}",
            "--image", str(EXAMPLE), "--prompt", "a cat", "--steps", "2", "--height", "48", "--width", "64"]
    for extra in (["--alpha", "2", "--out", str(tmp_path / "v.mp4")], ["--frames", "1", "--out", str(tmp_path)],
                  ["--out", str(tmp_path / "v.webm")]):
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().startswith("ti2i videoldm: error:") and "Traceback" not in done.stderr
    done = subprocess.run(base + ["--frames", "3", "--no-anchor-first-frame", "--quiet", "--out",
                                  str(tmp_path / "v.gif")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "v.gif").is_file()
