"""Inpainting, as diffusers' `StableDiffusionInpaintPipeline` with a 9-channel inpainting UNet.

The UNet sees [noise latent ‖ mask ‖ masked-image latent]: the mask (white = repaint) binarised and
resized to the latent grid, the image with the repainted region set to 0 (mid-gray) encoded by the VAE.
With strength 1 the latents start from pure noise; below 1 from the image's latent noised at the first
timestep that strength selects. Random draws come from one generator in the reference's order: the
image posterior sample (strength < 1 only), the initial noise, the masked-image posterior sample, then
whatever the scheduler draws at each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.images import load_image, prepare_image, prepare_mask, requested_size, to_pil
from ti2i.client.results import ImageResult
from ti2i.client.timing import Timings
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner

UNET = "unet_inpaint"
UNET_CHANNELS = 9  # noise latent (4) + mask (1) + masked-image latent (4)


def inpaint(
    runner: Runner,
    image: str | Path | Image.Image,
    mask: str | Path | Image.Image,
    prompt: str = "",
    negative_prompt: str | None = None,
    strength: float | None = None,
    steps: int = 50,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    scheduler: str = shared.MODEL_SCHEDULER,
    max_pixels: int | None = None,
    lora: Sequence[str] = (),
    control_image: str | Path | bytes | Image.Image | None = None,
    controlnet: str | None = None,
    control_scale: float = 0.5,
    control_start: float = 0.0,
    control_end: float = 1.0,
    original_height: int | None = None,
    original_width: int | None = None,
    crop_top: int | None = None,
    crop_left: int | None = None,
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "inpaint", lora)
    pipeline = runner.pipeline
    strength = shared.model_default(pipeline, "inpaint", "strength", strength)
    facts = shared.unet_facts(pipeline, UNET)

    # 1. Check inputs; the size defaults to the model's (as the reference: not the image's), and the
    #    image, the mask and the control image are each resized to it
    channels = facts.get("in_channels", UNET_CHANNELS)
    if channels != UNET_CHANNELS:
        raise InvalidInputError(f"inpainting needs a {UNET_CHANNELS}-channel inpainting UNet (latent ‖ mask ‖ "
                                f"masked-image latent); {UNET!r} of these engines has {channels} input channels")
    shared.check_range("strength", strength, 0.0, 1.0, low_open=True)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_scheduler(scheduler)
    shared.check_finite(guidance=guidance, eta=eta, control_scale=control_scale)
    pil = load_image(image, max_pixels)
    mask_pil = load_image(mask, max_pixels, what="mask", convert_rgb=False)
    factor = pipeline["vae_scale_factor"]
    height, width = requested_size(height, width, facts["default_size"], factor, max_pixels)
    do_cfg = guidance > 1.0
    control = shared.prepare_control(runner, control_image, controlnet, control_scale, control_start, control_end,
                                     height, width, 2 if do_cfg else 1, max_pixels)

    # 2. Encode the prompt: [uncond, cond] with guidance (SDXL: with its pooled text and size conditioning)
    with timings.stage("encode_prompt"):
        prompt_embeds, added = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg)
    added = shared.size_conditions(added, height, width, shared.SizeConditioning(
        original_height, original_width, crop_top, crop_left))

    # 3. Timesteps: the tail of the schedule that `strength` selects (all of it at 1)
    scheduler = shared.make_scheduler(pipeline, UNET, scheduler, seed)
    timesteps = shared.img2img_timesteps(scheduler, steps, strength)
    is_strength_max = strength == 1.0

    # 4. Preprocess the image and the mask; the masked image keeps what the mask does not repaint
    pixels = prepare_image(pil, height, width, factor, max_pixels)
    mask_condition = torch.from_numpy(prepare_mask(mask_pil, height, width, factor))
    with timings.stage("encode_image"):
        init_image = shared.preprocess_image(runner, pixels)
        masked_image = init_image * (mask_condition.to(init_image.device) < 0.5)
        # one encoder call: the masked image, and the image itself when its latent starts the chain
        batch = masked_image if is_strength_max else torch.cat([masked_image, init_image])
        mean, logvar = shared.encode_pixels(runner, batch)

    # 5. Latents: pure noise × the initial sigma, or the image latent noised at the first timestep
    generator = shared.generator(seed)
    scaling = pipeline["vae_scaling_factor"]
    if is_strength_max:
        latents = shared.noise_like(mean[:1], generator) * scheduler.init_noise_sigma
    else:
        image_latents = scaling * shared.sample_posterior(mean[1:], logvar[1:], generator)
        latents = scheduler.add_noise(image_latents, shared.noise_like(image_latents, generator), timesteps[:1])

    # 6. Mask and masked-image latents: the mask resized to the latent grid; [uncond, cond] copies with guidance
    masked_image_latents = scaling * shared.sample_posterior(mean[:1], logvar[:1], generator)
    mask_latents = torch.nn.functional.interpolate(mask_condition, size=(height // factor, width // factor))
    mask_latents = mask_latents.to(runner.device)  # resized on the host, as the reference does
    conditions = torch.cat([mask_latents, masked_image_latents], dim=1)
    if do_cfg:
        conditions = torch.cat([conditions] * 2)

    # 7. Denoising loop
    extra = shared.step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(shared.progress_steps(timesteps, "inpaint", progress)):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, UNET, scheduler, latents, t, prompt_embeds, guidance,
                                                  do_cfg, extra_channels=conditions, control=control,
                                                  step=(i, len(timesteps)), **added)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]

    # 8. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, scaling)
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())
