"""Stable Video Diffusion image-to-video, as diffusers' `StableVideoDiffusionPipeline`.

The clean image conditions the spatio-temporal UNet twice: through its CLIP image embedding and
through the VAE latent of a noise-augmented copy, concatenated to every frame's noise latent.
Euler (EDM/Karras sigmas, v-prediction) with guidance rising linearly over the frames; the temporal
VAE decoder runs in chunks of frames, so memory is bounded by the chunk size.
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

UNET = "unet_svd"
MAX_FRAMES = 64  # the exported UNet's and temporal decoder's frame range
FPS_RANGE = (1, 60)
MOTION_BUCKET_RANGE = (0, 1023)


def clip_pixels(image: Image.Image, processor: dict, size: int) -> torch.Tensor:
    """The CLIP input of the clean image: antialiased resize to size², then the processor's normalisation."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = _resize_with_antialiasing(x * 2.0 - 1.0, (size, size))
    x = (x + 1.0) / 2.0
    mean = torch.tensor(processor["image_mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(processor["image_std"], dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def check_video_inputs(frames: int, fps: int, motion_bucket_id: int, noise_aug: float,
                       decode_chunk_size: int) -> None:
    for name, value, (low, high) in (("frames", frames, (1, MAX_FRAMES)), ("fps", fps, FPS_RANGE),
                                     ("motion bucket id", motion_bucket_id, MOTION_BUCKET_RANGE),
                                     ("decode chunk size", decode_chunk_size, (1, MAX_FRAMES))):
        if not shared.whole(value) or not low <= value <= high:
            raise InvalidInputError(f"{name} must be an integer in [{low}, {high}], got {value}")
    shared.check_range("noise augmentation", noise_aug, 0.0, 1.0)


def svd(
    runner: Runner,
    image: str | Path | Image.Image,
    frames: int | None = None,
    steps: int = 25,
    fps: int = 7,
    motion_bucket_id: int = 127,
    noise_aug: float = 0.02,
    min_guidance: float = 1.0,
    max_guidance: float = 3.0,
    decode_chunk_size: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    max_pixels: int | None = None,
    progress: shared.Progress = True,
) -> VideoResult:
    timings = Timings()
    runner = shared.method_runner(runner, "svd")
    pipeline = runner.pipeline
    facts = shared.unet_facts(pipeline, UNET)

    # 1. Check inputs
    frames = facts["num_frames"] if frames is None else frames
    decode_chunk_size = frames if decode_chunk_size is None else decode_chunk_size
    check_video_inputs(frames, fps, motion_bucket_id, noise_aug, decode_chunk_size)
    shared.check_steps(steps, at_most=shared.most_steps(pipeline, UNET))
    shared.check_finite(min_guidance=min_guidance, max_guidance=max_guidance)
    pil = load_image(image, max_pixels)
    height = facts["default_height"] if height is None else height
    width = facts["default_width"] if width is None else width
    do_cfg = max_guidance > 1.0

    # 2. CLIP embedding of the clean image; zeros as the unconditional branch
    with timings.stage("encode_image_clip"):
        pixel_values = clip_pixels(pil, pipeline["image_processor"], pipeline["image_encoder_size"])
        embeds = runner.run_tensors("image_encoder", pixel_values=pixel_values)["image_embeds"]
    embeds = embeds[:, None]
    if do_cfg:
        embeds = torch.cat([torch.zeros_like(embeds), embeds])

    # 3. VAE latent of the noise-augmented image: the posterior's mode, unscaled, repeated over frames
    generator = shared.generator(seed)
    pixels = prepare_image(pil, height, width, pipeline["vae_scale_factor"], max_pixels)
    with timings.stage("encode_image"):
        images = shared.preprocess_image(runner, pixels)
        images = images + noise_aug * shared.noise_like(images, generator)
        image_latents, _ = shared.encode_pixels(runner, images)
    if do_cfg:
        image_latents = torch.cat([torch.zeros_like(image_latents), image_latents])
    image_latents = image_latents[:, None].repeat(1, frames, 1, 1, 1)

    # 4. Micro-conditioning: [fps − 1, motion bucket, noise augmentation]
    added_time_ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug]], dtype=torch.float32).to(runner.device)
    if do_cfg:
        added_time_ids = torch.cat([added_time_ids, added_time_ids])

    # 5. Timesteps: the model folder's Euler scheduler (EDM/Karras sigmas, v-prediction)
    scheduler = shared.make_scheduler(pipeline, UNET)
    scheduler.set_timesteps(steps)

    # 6. Latents: noise × the initial sigma, [1, F, C, h, w]
    shape = (1, frames, image_latents.shape[2], image_latents.shape[3], image_latents.shape[4])
    latents = shared.randn(shape, generator, runner.device) * scheduler.init_noise_sigma

    # 7. Denoising loop, guidance rising linearly from the first frame to the last
    guidance = torch.linspace(min_guidance, max_guidance, frames)[None, :, None, None, None].to(runner.device)
    for t in shared.progress_steps(scheduler.timesteps, "svd", progress):
        model_input = torch.cat([latents] * 2) if do_cfg else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, t), image_latents], dim=2)
        with timings.stage("unet"):
            noise_pred = shared.run_unet(runner, UNET, model_input, t, embeds, added_time_ids=added_time_ids)
        if do_cfg:
            noise_pred = shared.guide(*noise_pred.chunk(2), guidance)
        latents = scheduler.step(noise_pred, t, latents).prev_sample

    # 8. Decode in chunks of frames
    flat = latents.flatten(0, 1) * (1 / pipeline["vae_scaling_factor"])
    video, video_float = [], []
    for start in shared.progress_steps(range(0, frames, decode_chunk_size), "decode", progress):
        with timings.stage("decode_chunk"):
            chunk = runner.run_tensors("vae_decoder_temporal", latent=flat[start:start + decode_chunk_size])
            out = runner.run_to_host("image_postprocess", images=chunk["images"])  # the frames come back once
        video.append(out["image"])
        video_float.append(out["image_float"])
    return VideoResult(np.concatenate(video), np.concatenate(video_float), fps, timings, latents.cpu())
