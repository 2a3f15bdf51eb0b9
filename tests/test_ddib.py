"""DDIB matches a reference loop composed from diffusers' DDIMInverseScheduler, DDIMScheduler and the torch
modules; decoding under the source prompt returns the input latent up to a discretisation error that
shrinks as the steps grow."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLE, max_abs
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    DDIMScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from ti2i.client import cli
from ti2i.client import steps as shared
from ti2i.client.ddib import ddib
from ti2i.client.images import prepare_image
from ti2i.client.runners import InProcessRunner, TritonRunner
from transformers import CLIPTextModel, CLIPTokenizer

from ti2i.errors import InvalidInputError

TOLERANCE = 1e-3  # max |Δ| on the [0, 1] float image


class ReferenceDDIB:
    """DDIB written directly on the diffusers modules and schedulers of the tiny SD folder."""

    def __init__(self, folder):
        self.folder = folder
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval()
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.processor = VaeImageProcessor(vae_scale_factor=2 ** (len(self.vae.config.block_out_channels) - 1))

    def embed(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def noise_pred(self, latents, t, embeds, guidance):
        if guidance > 1.0:
            out = self.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([self.embed(""), embeds]))
            uncond, cond = out.sample.chunk(2)
            return uncond + guidance * (cond - uncond)
        return self.unet(latents, t, encoder_hidden_states=embeds).sample

    @torch.no_grad()
    def __call__(self, image, prompt, source_prompt, strength, steps, guidance, source_guidance):
        inverse = DDIMInverseScheduler.from_pretrained(self.folder, subfolder="scheduler")
        forward = DDIMScheduler.from_pretrained(self.folder, subfolder="scheduler")
        inverse.set_timesteps(steps)
        forward.set_timesteps(steps)
        count = min(int(steps * strength), steps)
        pixels = self.processor.preprocess(image)
        latents = self.vae.encode(pixels).latent_dist.mode() * self.vae.config.scaling_factor
        source, target = self.embed(source_prompt), self.embed(prompt)
        for t in inverse.timesteps[:count]:
            latents = inverse.step(self.noise_pred(latents, t, source, source_guidance), t, latents).prev_sample
        for t in forward.timesteps[steps - count:]:
            latents = forward.step(self.noise_pred(latents, t, target, guidance), t, latents).prev_sample
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return self.processor.postprocess(decoded, output_type="np")[0]


@pytest.fixture(scope="module")
def reference(sd_model):
    return ReferenceDDIB(str(sd_model))


CASES = {
    "unguided_all_the_way": dict(strength=1.0, guidance=1.0, source_guidance=1.0),
    "guided_partial": dict(strength=0.6, guidance=3.0, source_guidance=2.0),
    "guided_decode_only": dict(strength=0.8, guidance=7.5, source_guidance=1.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_the_reference_loop(case, reference, engines, example_image, record_property):
    kwargs = CASES[case]
    expected = reference(example_image, "a dog", "a cat", steps=10, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = ddib(runner, example_image, "a dog", "a cat", steps=10, progress=False, **kwargs)
    assert got.array.shape == expected.shape == (48, 64, 3)
    error = max_abs(got.array, expected)
    record_property("max_abs_error", error)
    print(f"ddib {case}: max |Δ| to the reference loop = {error:.2e}")
    assert error <= TOLERANCE


def test_triton_matches_in_process(engines, triton_server, example_image):
    kwargs = CASES["guided_partial"]
    with TritonRunner(f"grpc://{triton_server.grpc_url}") as runner:
        served = ddib(runner, example_image, "a dog", "a cat", steps=6, progress=False, **kwargs)
    with InProcessRunner(engines.root) as runner:
        local = ddib(runner, example_image, "a dog", "a cat", steps=6, progress=False, **kwargs)
    assert max_abs(served.array, local.array) <= 1e-5


def test_decoding_under_the_source_prompt_returns_the_input_latent(engines, example_image, record_property):
    """Target = source prompt, guidance 1: the decoding retraces the inversion; the error is the ODE's
    discretisation error, first order in the step size (it about halves as the steps double)."""
    errors = {}
    with InProcessRunner(engines.root) as runner:
        pixels = prepare_image(example_image, None, None, runner.pipeline["vae_scale_factor"])
        mean, _ = shared.encode_image(runner, pixels)
        x0 = runner.pipeline["vae_scaling_factor"] * mean
        for steps in (10, 25, 50):
            result = ddib(runner, example_image, "a cat", "a cat", steps=steps, progress=False)
            errors[steps] = (result.latents - x0).abs().max().item()
        edited = ddib(runner, example_image, "a dog", "a cat", steps=50, progress=False)
    edit_distance = (edited.latents - x0).abs().max().item()
    record_property("reconstruction_max_abs_error_by_steps", errors)
    print(f"ddib reconstruction max |z − z0| by steps: {errors} (|z0|max = {x0.abs().max().item():.3f}); "
          f"another target prompt at 50 steps: {edit_distance:.3f}")
    assert errors[10] > errors[25] > errors[50]
    assert errors[50] < 0.6 * errors[10]
    assert edit_distance > 1.3 * errors[50]  # the target prompt, not only the discretisation, moves it


def test_bad_input_is_a_clear_error(engines, example_image):
    with InProcessRunner(engines.root) as runner:
        for kwargs, words in ((dict(source_prompt=None), ("source prompt",)),
                              (dict(strength=0.0), ("strength",)),
                              (dict(steps=1000), ("steps", "at most 999")),
                              (dict(guidance=float("nan")), ("guidance", "finite")),
                              (dict(steps=2, strength=0.2), ("strength", "steps"))):
            args = {"source_prompt": "a cat", "steps": 2, **kwargs}
            with pytest.raises(InvalidInputError) as info:
                ddib(runner, example_image, "a dog", progress=False, **args)
            for word in words:
                assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("options, words", [
    (["--strength", "1.5"], ("strength",)),
    (["--image", "{tmp}/nope.png"], ("nope.png", "does not exist")),
    (["--steps", "0"], ("steps",)),
])
def test_cli_bad_input_exits_2_with_one_line(options, words, engines, tmp_path, capsys):
    options = [o.format(tmp=tmp_path) for o in options]
    argv = ["ddib", "--engines", str(engines.root), "--source-prompt", "a cat", "--prompt", "a dog", "--steps", "2",
            "--out", str(tmp_path / "out.png")]
    if "--image" not in options:
        argv += ["--image", str(EXAMPLE)]
    assert cli.main(argv + options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ti2i ddib: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert not (tmp_path / "out.png").exists()
