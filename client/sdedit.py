"""SDEdit: image-to-image from a noised input, as diffusers' `StableDiffusionImg2ImgPipeline`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.images import load_image, prepare_image, to_pil
from ti2i.client.results import ImageResult
from ti2i.client.timing import Timings
from ti2i.runner import Runner


def sdedit(
    runner: Runner,
    image: str | Path | Image.Image,
    prompt: str,
    negative_prompt: str | None = None,
    strength: float | None = None,
    steps: int = 50,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    eta: float = 0.0,
    scheduler: str = shared.MODEL_SCHEDULER,
    max_pixels: int | None = None,
    lora: Sequence[str] = (),
    control_image: str | Path | bytes | Image.Image | None = None,
    controlnet: str | None = None,
    control_scale: float = 0.8,
    control_start: float = 0.0,
    control_end: float = 1.0,
    original_height: int | None = None,
    original_width: int | None = None,
    crop_top: int | None = None,
    crop_left: int | None = None,
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "sdedit", lora)
    pipeline = runner.pipeline
    strength = shared.model_default(pipeline, "sdedit", "strength", strength)
    guidance = shared.model_default(pipeline, "sdedit", "guidance", guidance)

    # 1. Check inputs
    shared.check_range("strength", strength, 0.0, 1.0, low_open=True)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, "unet"))
    shared.check_scheduler(scheduler)
    shared.check_finite(guidance=guidance, eta=eta, control_scale=control_scale)
    pil = load_image(image, max_pixels)
    do_cfg = guidance > 1.0
    control = shared.prepare_control(runner, control_image, controlnet, control_scale, control_start, control_end,
                                     height, width, 2 if do_cfg else 1, max_pixels)

    # 2. Preprocess the image: snapped to the VAE factor, resized like the reference
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)
    if control is not None:
        control.check_size(*pixels.shape[1:3])

    # 3. Encode the prompt: [uncond, cond] with guidance (SDXL: with its pooled text and size conditioning)
    with timings.stage("encode_prompt"):
        prompt_embeds, added = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg)
    added = shared.size_conditions(added, *pixels.shape[1:3], shared.SizeConditioning(
        original_height, original_width, crop_top, crop_left))

    # 4. Timesteps: the tail of the schedule that `strength` selects
    scheduler = shared.make_scheduler(pipeline, "unet", scheduler, seed)
    timesteps = shared.img2img_timesteps(scheduler, steps, strength)

    # 5. Latents: a sample of the posterior, scaled, noised once at the first timestep
    generator = shared.generator(seed)
    with timings.stage("encode_image"):
        mean, logvar = shared.encode_image(runner, pixels)
    latents = pipeline["vae_scaling_factor"] * shared.sample_posterior(mean, logvar, generator)
    noise = shared.noise_like(latents, generator)
    latents = scheduler.add_noise(latents, noise, timesteps[:1])

    # 6. Denoising loop
    extra = shared.step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(shared.progress_steps(timesteps, "sdedit", progress)):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, "unet", scheduler, latents, t, prompt_embeds, guidance,
                                                  do_cfg, control=control, step=(i, len(timesteps)), **added)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]

    # 7. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, pipeline["vae_scaling_factor"])
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())

