"""Video LDM image-to-video: temporal layers on a frozen image LDM, merged with α.

The SD 1.x UNet with AnimateDiff motion modules (the public instance of the Video LDM recipe)
denoises all frames jointly. Every frame starts from the input image's latent noised to `strength`
(SDEdit on a still video, as `AnimateDiffVideoToVideoPipeline` with the image repeated); with
`anchor_first_frame`, frame 0 is put back on the input image's trajectory after every step
(training-free context-frame conditioning) and is exactly the input's latent at the end. α = 1 skips
every temporal layer (the image model per frame), α = 0 is the motion adapter as trained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.images import load_image, prepare_image
from ti2i.client.results import VideoResult
from ti2i.client.timing import Timings
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner

UNET = "unet_motion"
VAE_CHUNK = 16  # frames per VAE call, as the reference's decode_chunk_size
# The schedule AnimateDiff's motion modules were trained with (its inference configs and diffusers' docs).
LINEAR_DDIM_NAME = "linear-ddim"
LINEAR_DDIM = dict(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1)


def make_video_scheduler(pipeline: dict, scheduler: str, seed: int):
    """The model folder's scheduler, any of `steps.make_scheduler`'s names, or linear-beta DDIM."""
    if scheduler == LINEAR_DDIM_NAME:
        return shared.make_scheduler(pipeline, UNET, "DDIMScheduler", **LINEAR_DDIM)
    return shared.make_scheduler(pipeline, UNET, scheduler, seed)


def videoldm(
    runner: Runner,
    image: str | Path | Image.Image,
    prompt: str,
    negative_prompt: str | None = None,
    frames: int = 16,
    strength: float = 0.8,
    steps: int = 50,
    guidance: float = 7.5,
    alpha: float = 0.0,
    anchor_first_frame: bool = True,
    scheduler: str = "model",
    fps: float = 8.0,
    eta: float = 0.0,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    progress: shared.Progress = True,
) -> VideoResult:
    timings = Timings()
    runner = shared.method_runner(runner, "videoldm")
    pipeline = runner.pipeline
    facts = shared.unet_facts(pipeline, UNET)

    # 1. Check inputs
    max_frames = facts["max_frames"]
    if not shared.whole(frames) or not 2 <= frames <= max_frames:
        raise InvalidInputError(f"frames must be an integer in [2, {max_frames}], got {frames}")
    shared.check_range("alpha", alpha, 0.0, 1.0)
    shared.check_range("strength", strength, 0.0, 1.0, low_open=True)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_finite(guidance=guidance, eta=eta, fps=fps)
    if fps <= 0:
        raise InvalidInputError(f"fps must be positive, got {fps}")
    pil = load_image(image, max_pixels)
    sched = make_video_scheduler(pipeline, scheduler, seed)
    do_cfg = guidance > 1.0

    # 2. Encode the prompt: [uncond, cond] with guidance
    with timings.stage("encode_prompt"):
        prompt_embeds, _ = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg)

    # 3. Timesteps: the tail of the schedule that `strength` selects
    timesteps = shared.img2img_timesteps(sched, steps, strength)

    # 4. Latents: per frame a sample of the image's posterior, scaled, noised at the first timestep
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)
    generator = shared.generator(seed)
    with timings.stage("encode_image"):
        mean, logvar = shared.encode_image(runner, pixels)
    posterior = [shared.sample_posterior(mean.expand(n, -1, -1, -1), logvar.expand(n, -1, -1, -1), generator)
                 for n in _chunks(frames)]  # drawn chunk by chunk as the reference encodes a video
    clean = pipeline["vae_scaling_factor"] * torch.cat(posterior)  # [F, C, h, w]
    first_noise = shared.noise_like(clean[None], generator)  # [1, F, C, h, w]
    latents = sched.add_noise(clean[None], first_noise, timesteps[:1]).permute(0, 2, 1, 3, 4)  # [1, C, F, h, w]
    anchor, anchor_noise = clean[0], first_noise[0, 0]

    # 5. Denoising loop: all frames jointly; frame 0 optionally kept on the input's trajectory
    extra = shared.step_kwargs(sched, generator, eta)
    alphas = torch.full((2 if do_cfg else 1,), float(alpha), device=runner.device)
    for i, t in enumerate(shared.progress_steps(timesteps, "videoldm", progress)):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, UNET, sched, latents, t, prompt_embeds, guidance, do_cfg,
                                                  alpha=alphas)
        latents = sched.step(noise_pred, t, latents, **extra, return_dict=False)[0]
        if anchor_first_frame:
            last = i == len(timesteps) - 1
            latents[:, :, 0] = anchor if last else sched.add_noise(anchor, anchor_noise, timesteps[i + 1:i + 2])

    # 6. Decode frame by frame, in chunks
    flat = latents.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [F, C, h, w]
    video, video_float = [], []
    for start in shared.progress_steps(range(0, frames, VAE_CHUNK), "decode", progress):
        with timings.stage("decode_image"):
            images, arrays = shared.decode_latents(runner, flat[start:start + VAE_CHUNK],
                                                   pipeline["vae_scaling_factor"])
        video.append(images)
        video_float.append(arrays)
    return VideoResult(np.concatenate(video), np.concatenate(video_float), fps, timings, latents.cpu())


def _chunks(frames: int) -> list[int]:
    return [min(VAE_CHUNK, frames - start) for start in range(0, frames, VAE_CHUNK)]
