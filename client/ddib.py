"""DDIB (Dual Diffusion Implicit Bridges, Su et al., ICLR 2023): deterministic DDIM inversion, then decoding.

The input's latent is carried up the probability-flow ODE by DDIM inversion under the source prompt (the
step math of diffusers' `DDIMInverseScheduler`) to the timestep `strength` selects, then brought back
down by deterministic DDIM (η = 0) under the target prompt. Nothing is random: the latent is the VAE
posterior's mean. With the target prompt equal to the source prompt and equal guidance, decoding
retraces the inversion and returns the input latent up to the ODE's discretisation error, which shrinks
as the steps grow. DDIB inverts without guidance (source guidance 1); both scales are free here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.images import load_image, prepare_image, to_pil
from ti2i.client.results import ImageResult
from ti2i.client.timing import Timings
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner

UNET = "unet"


def ddib_timesteps(pipeline: dict, steps: int, strength: float):
    """(DDIM decoder, its timesteps; DDIM inverter, its timesteps): the inversion climbs exactly the
    timesteps the decoding descends, the top one selected by `strength` as in img2img."""
    decoder = shared.make_scheduler(pipeline, UNET, "DDIMScheduler")
    inverter = shared.make_scheduler(pipeline, UNET, "DDIMInverseScheduler")
    spacing = decoder.config.timestep_spacing
    if spacing not in ("leading", "trailing"):
        raise InvalidInputError(f"DDIM inversion supports 'leading' or 'trailing' timestep spacing; the model's "
                                f"scheduler config has {spacing!r}")
    decode = shared.img2img_timesteps(decoder, steps, strength)
    inverter.set_timesteps(steps)
    invert = inverter.timesteps[:len(decode)]
    assert torch.equal(invert.flip(0), decode), (invert, decode)
    return decoder, decode, inverter, invert


def ddib(
    runner: Runner,
    image: str | Path | Image.Image,
    prompt: str,
    source_prompt: str,
    strength: float = 1.0,
    steps: int = 50,
    guidance: float = 1.0,
    source_guidance: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    lora: Sequence[str] = (),
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "ddib", lora)
    pipeline = runner.pipeline

    # 1. Check inputs
    if source_prompt is None:
        raise InvalidInputError("DDIB needs a source prompt that describes the input image")
    shared.check_range("strength", strength, 0.0, 1.0, low_open=True)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_finite(guidance=guidance, source_guidance=source_guidance)
    pil = load_image(image, max_pixels)
    source_cfg, target_cfg = source_guidance > 1.0, guidance > 1.0

    # 2. Encode the prompts: [uncond, cond] per direction with guidance (uncond is "")
    with timings.stage("encode_prompt"):
        uncond, source, target = shared.encode_prompts(runner, ["", source_prompt, prompt]).chunk(3)
    source_embeds = torch.cat([uncond, source]) if source_cfg else source
    target_embeds = torch.cat([uncond, target]) if target_cfg else target

    # 3. Preprocess the image
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)

    # 4. Timesteps: inversion up to the timestep `strength` selects, decoding back down from it
    decoder, decode_timesteps, inverter, invert_timesteps = ddib_timesteps(pipeline, steps, strength)

    # 5. The input latent: the posterior's mean, scaled (deterministic)
    with timings.stage("encode_image"):
        mean, _ = shared.encode_image(runner, pixels)
    latents = pipeline["vae_scaling_factor"] * mean

    # 6. DDIM inversion under the source prompt
    for t in shared.progress_steps(invert_timesteps, "ddib invert", progress):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, UNET, inverter, latents, t, source_embeds,
                                                  source_guidance, source_cfg)
        latents = inverter.step(noise_pred, t, latents, return_dict=False)[0]

    # 7. Deterministic DDIM decoding under the target prompt
    for t in shared.progress_steps(decode_timesteps, "ddib decode", progress):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, UNET, decoder, latents, t, target_embeds, guidance,
                                                  target_cfg)
        latents = decoder.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]

    # 8. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, pipeline["vae_scaling_factor"])
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())
