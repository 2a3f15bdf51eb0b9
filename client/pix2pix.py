"""InstructPix2Pix: editing by instruction, as diffusers' `StableDiffusionInstructPix2PixPipeline`.

The 8-channel UNet sees [noise latent ‖ image latent]; with guidance one call runs the 3-way batch
[text + image, image only, neither] and ε = e_u + s_T·(e_text − e_image) + s_I·(e_image − e_u).
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
from ti2i.runner import Runner

UNET = "unet_pix2pix"


def pix2pix(
    runner: Runner,
    image: str | Path | Image.Image,
    prompt: str,
    negative_prompt: str | None = None,
    steps: int = 100,
    guidance: float | None = None,
    image_guidance: float = 1.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    scheduler: str = shared.MODEL_SCHEDULER,
    max_pixels: int | None = None,
    lora: Sequence[str] = (),
    original_height: int | None = None,
    original_width: int | None = None,
    crop_top: int | None = None,
    crop_left: int | None = None,
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "pix2pix", lora)
    pipeline = runner.pipeline
    guidance = shared.model_default(pipeline, "pix2pix", "guidance", guidance)

    # 1. Check inputs (an empty instruction is allowed, as in the reference)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_finite(guidance=guidance, image_guidance=image_guidance, eta=eta)
    pil = load_image(image, max_pixels)
    scheduler = shared.make_scheduler(pipeline, UNET, scheduler, seed)
    do_cfg = guidance > 1.0 and image_guidance >= 1.0

    # 2. Encode the prompt: [text, negative, negative] with guidance (SDXL: with its pooled text and size
    #    conditioning, laid out the same)
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)
    with timings.stage("encode_prompt"):
        prompt_embeds, added = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg)
    added = shared.size_conditions(added, *pixels.shape[1:3], shared.SizeConditioning(
        original_height, original_width, crop_top, crop_left))
    if do_cfg:
        prompt_embeds, added = _text_first(prompt_embeds), {k: _text_first(v) for k, v in added.items()}

    # 3. Encode the image: the posterior's mode, unscaled (CosXL Edit: scaled); [c_I, c_I, 0] with guidance
    with timings.stage("encode_image"):
        image_latents, _ = shared.encode_image(runner, pixels)
    if shared.unet_facts(pipeline, UNET).get("scaled_image_latents"):
        image_latents = image_latents * pipeline["vae_scaling_factor"]
    if do_cfg:
        image_latents = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])

    # 4. Timesteps: the whole schedule
    shared.set_timesteps(scheduler, steps)
    timesteps = scheduler.timesteps

    # 5. Latents: noise × the scheduler's initial sigma
    generator = shared.generator(seed)
    latents = shared.noise_like(image_latents[:1], generator) * scheduler.init_noise_sigma

    # 6. Denoising loop
    extra = shared.step_kwargs(scheduler, generator, eta)
    for t in shared.progress_steps(timesteps, "pix2pix", progress):
        model_input = torch.cat([latents] * 3) if do_cfg else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, t), image_latents], dim=1)
        with timings.stage("unet"):
            noise_pred = shared.run_unet(runner, UNET, model_input, t, prompt_embeds, **added)
        if do_cfg:
            e_text, e_image, e_uncond = noise_pred.chunk(3)
            noise_pred = e_uncond + guidance * (e_text - e_image) + image_guidance * (e_image - e_uncond)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]

    # 7. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, pipeline["vae_scaling_factor"])
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())


def _text_first(pair: torch.Tensor) -> torch.Tensor:
    """[negative, text] rows -> [text, negative, negative]: the three guidance branches' text conditioning."""
    negative, text = pair.chunk(2)
    return torch.cat([text, negative, negative])
