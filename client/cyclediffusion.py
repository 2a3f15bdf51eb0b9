"""CycleDiffusion: stochastic DPM-Encoder editing, as diffusers' `CycleDiffusionPipeline`.

The source and target chains start from the same noised latent. At each step the source chain is
sampled from the DDIM-η posterior given x_t and the clean latent x_0, the noise that makes the
source model reproduce that sample is computed, and the target chain steps with that same noise:
the latent code (x_t, ε_t, …, ε_1) that reconstructs the input under the source prompt is decoded
under the target prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.images import load_image, prepare_image, to_pil
from ti2i.client.results import ImageResult
from ti2i.client.timing import Timings
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner

UNET = "unet"


def _alphas(scheduler: DDIMScheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ᾱ_t, ᾱ_prev and the previous timestep of a DDIM step from t."""
    prev_t = int(t) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    return alpha_prod_t, alpha_prod_prev, prev_t


def posterior_sample(scheduler: DDIMScheduler, x_t: torch.Tensor, t: torch.Tensor, x_0: torch.Tensor,
                     generator: torch.Generator, eta: float) -> torch.Tensor:
    """x_{t−1} ~ q(x_{t−1} | x_t, x_0) of DDIM-η; exactly x_0 at the last step."""
    alpha_prod_t, alpha_prod_prev, prev_t = _alphas(scheduler, t)
    if prev_t <= 0:
        return x_0
    std_dev_t = eta * scheduler._get_variance(t, prev_t) ** 0.5
    e_t = (x_t - alpha_prod_t**0.5 * x_0) / (1 - alpha_prod_t) ** 0.5
    direction = (1.0 - alpha_prod_prev - std_dev_t**2) ** 0.5 * e_t
    noise = std_dev_t * shared.noise_like(x_0, generator)
    return alpha_prod_prev**0.5 * x_0 + direction + noise


def compute_noise(scheduler: DDIMScheduler, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  noise_pred: torch.Tensor, eta: float) -> torch.Tensor:
    """The ε_t with which the DDIM-η step from x_t under `noise_pred` lands exactly on x_prev."""
    alpha_prod_t, alpha_prod_prev, prev_t = _alphas(scheduler, t)
    pred_x0 = (x_t - (1 - alpha_prod_t) ** 0.5 * noise_pred) / alpha_prod_t**0.5
    if scheduler.config.clip_sample:
        pred_x0 = torch.clamp(pred_x0, -1, 1)
    variance = scheduler._get_variance(t, prev_t)
    std_dev_t = eta * variance**0.5
    direction = (1 - alpha_prod_prev - std_dev_t**2) ** 0.5 * noise_pred
    return (x_prev - (alpha_prod_prev**0.5 * pred_x0 + direction)) / (variance**0.5 * eta)


def cyclediffusion(
    runner: Runner,
    image: str | Path | Image.Image,
    prompt: str,
    source_prompt: str,
    strength: float = 0.8,
    steps: int = 50,
    guidance: float = 7.5,
    source_guidance: float = 1.0,
    eta: float = 0.1,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    lora: Sequence[str] = (),
    progress: shared.Progress = True,
) -> ImageResult:
    timings = Timings()
    runner = shared.method_runner(runner, "cyclediffusion", lora)
    pipeline = runner.pipeline

    # 1. Check inputs
    if source_prompt is None:
        raise InvalidInputError("CycleDiffusion needs a source prompt that describes the input image")
    shared.check_range("strength", strength, 0.0, 1.0, low_open=True)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, "unet"))
    shared.check_finite(guidance=guidance, source_guidance=source_guidance, eta=eta)
    if not eta > 0:
        raise InvalidInputError(f"eta must be > 0 for CycleDiffusion (the DPM-Encoder divides by σ_t), got {eta}")
    pil = load_image(image, max_pixels)
    do_cfg = guidance > 1.0

    # 2. Encode the prompts: [uncond, cond] per chain with guidance (uncond is "")
    with timings.stage("encode_prompt"):
        texts = ["", source_prompt, prompt] if do_cfg else [source_prompt, prompt]
        embeds = shared.encode_prompts(runner, texts)
    source_embeds, target_embeds = (embeds[[0, 1]], embeds[[0, 2]]) if do_cfg else (embeds[:1], embeds[1:])
    # one UNet batch per step: [src uncond, tgt uncond, src cond, tgt cond] or [src, tgt]
    unet_embeds = torch.cat([source_embeds[:1], target_embeds[:1], source_embeds[1:], target_embeds[1:]]) \
        if do_cfg else torch.cat([source_embeds, target_embeds])

    # 3. Preprocess the image
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)

    # 4. Timesteps: DDIM built from the model's scheduler config (the DPM-Encoder needs DDIM's posterior)
    scheduler = shared.make_scheduler(pipeline, UNET, "DDIMScheduler")
    timesteps = shared.img2img_timesteps(scheduler, steps, strength)

    # 5. Latents: both chains start from the same noised sample of the posterior
    generator = shared.generator(seed)
    with timings.stage("encode_image"):
        mean, logvar = shared.encode_image(runner, pixels)
    clean_latents = pipeline["vae_scaling_factor"] * shared.sample_posterior(mean, logvar, generator)
    latents = scheduler.add_noise(clean_latents, shared.noise_like(clean_latents, generator), timesteps[:1])
    source_latents = latents

    # 6. Denoising loop
    for t in shared.progress_steps(timesteps, "cyclediffusion", progress):
        src_in = scheduler.scale_model_input(source_latents, t)
        tgt_in = scheduler.scale_model_input(latents, t)
        unet_in = torch.cat([src_in, tgt_in, src_in, tgt_in]) if do_cfg else torch.cat([src_in, tgt_in])
        with timings.stage("unet"):
            noise_pred = shared.run_unet(runner, UNET, unet_in, t, unet_embeds)
        if do_cfg:
            src_u, tgt_u, src_c, tgt_c = noise_pred.chunk(4)
            source_pred = shared.guide(src_u, src_c, source_guidance)
            target_pred = shared.guide(tgt_u, tgt_c, guidance)
        else:
            source_pred, target_pred = noise_pred.chunk(2)
        prev_source = posterior_sample(scheduler, source_latents, t, clean_latents, generator, eta)
        noise = compute_noise(scheduler, prev_source, source_latents, t, source_pred, eta)
        source_latents = prev_source
        latents = scheduler.step(target_pred, t, latents, eta=eta, variance_noise=noise).prev_sample

    # 7. Decode
    with timings.stage("decode_image"):
        images, arrays = shared.decode_latents(runner, latents, pipeline["vae_scaling_factor"])
    return ImageResult(to_pil(images[0]), arrays[0], timings, latents.cpu())
