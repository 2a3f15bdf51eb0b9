"""Text-to-image, as diffusers' `StableDiffusionPipeline`: noise × the initial sigma, guided denoising, decode."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ti2i.client import refiner
from ti2i.client import steps as shared
from ti2i.client.images import requested_size, to_pil
from ti2i.client.results import ImageResult
from ti2i.client.timing import Timings
from ti2i.runner import Runner

UNET = "unet"


def txt2img(
    runner: Runner,
    prompt: str,
    negative_prompt: str | None = None,
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
    control_scale: float = 1.0,
    control_start: float = 0.0,
    control_end: float = 1.0,
    original_height: int | None = None,
    original_width: int | None = None,
    crop_top: int | None = None,
    crop_left: int | None = None,
    refine: float | None = None,
    aesthetic_score: float | None = None,
    negative_aesthetic_score: float | None = None,
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "txt2img", lora)
    pipeline = runner.pipeline
    guidance = shared.model_default(pipeline, "txt2img", "guidance", guidance)
    facts = shared.unet_facts(pipeline, UNET)

    # 1. Check inputs; the size defaults to the control image's, else the model's (UNet sample size × VAE
    #    factor: 512 for SD 1.5)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_scheduler(scheduler)
    shared.check_finite(guidance=guidance, eta=eta, control_scale=control_scale)
    refiner.check_refine(pipeline, refine, aesthetic_score, negative_aesthetic_score)
    factor = pipeline["vae_scale_factor"]
    do_cfg = guidance > 1.0
    control = shared.prepare_control(runner, control_image, controlnet, control_scale, control_start, control_end,
                                     height, width, 2 if do_cfg else 1, max_pixels)
    height, width = control.size if control else requested_size(height, width, facts["default_size"], factor,
                                                                 max_pixels)

    # 2. Encode the prompt: [uncond, cond] with guidance (SDXL: with its pooled text and size conditioning)
    with timings.stage("encode_prompt"):
        prompt_embeds, added = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg)
    sizes = shared.SizeConditioning(original_height, original_width, crop_top, crop_left)
    added = shared.size_conditions(added, height, width, sizes)

    # 3. Timesteps: the whole schedule of the scheduler asked for (the model folder's by default); with a
    #    refiner, the part before the handoff
    scheduler_name, scheduler = scheduler, shared.make_scheduler(pipeline, UNET, scheduler, seed)
    shared.set_timesteps(scheduler, steps)
    timesteps = scheduler.timesteps if refine is None else refiner.base_timesteps(scheduler, refine)

    # 4. Latents: noise × the scheduler's initial sigma
    generator = shared.generator(seed)
    shape = (1, pipeline["latent_channels"], height // factor, width // factor)
    latents = shared.randn(shape, generator, runner.device) * scheduler.init_noise_sigma

    # 5. Denoising loop
    extra = shared.step_kwargs(scheduler, generator, eta)
    for i, t in enumerate(shared.progress_steps(timesteps, "txt2img", progress)):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, UNET, scheduler, latents, t, prompt_embeds, guidance, do_cfg,
                                                  control=control, step=(i, len(timesteps)), **added)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]

    # 6. Refine: the refiner denoises the rest of the schedule (SDXL's ensemble of experts), same generator
    if refine is not None:
        latents = refiner.refine_latents(runner, latents, prompt, negative_prompt, steps, refine, guidance,
                                         scheduler_name, seed, generator, eta, sizes, aesthetic_score,
                                         negative_aesthetic_score, timings, progress)

    # 7. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, pipeline["vae_scaling_factor"])
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())
