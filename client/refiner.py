"""SDXL's ensemble of experts: the base denoises the start of the schedule, the refiner the rest.

As diffusers' recipe: `StableDiffusionXLPipeline(..., denoising_end=f, output_type="latent")`, then
`StableDiffusionXLImg2ImgPipeline(refiner)(..., image=latents, denoising_start=f)` with the same generator.
The refiner joins its base's engine directory (`ti2i export`) and encodes prompts with the base's graph: its
text encoder is the base's second, so its text is the last part of the base's and the pooled text the same.
"""

from __future__ import annotations

import torch

from ti2i.client import steps as shared
from ti2i.client.registry import REFINER
from ti2i.client.timing import Timings
from ti2i.errors import InvalidInputError
from ti2i.runner import Runner

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the refiner pipeline's defaults


def cutoff(scheduler, fraction: float) -> int:
    """The discrete timestep where the handoff at `fraction` of the schedule happens."""
    total = scheduler.config.num_train_timesteps
    return int(round(total - fraction * total))


def base_timesteps(scheduler, fraction: float) -> torch.Tensor:
    """The base's part of its schedule: the timesteps at or above the handoff (`denoising_end`)."""
    timesteps = scheduler.timesteps
    return timesteps[:int((timesteps >= cutoff(scheduler, fraction)).sum())]


def refiner_timesteps(scheduler, steps: int, fraction: float) -> torch.Tensor:
    """The refiner's part of its own schedule of `steps`: those below the handoff (`denoising_start`; a
    second-order scheduler gets an odd count, so it ends on a whole step)."""
    shared.set_timesteps(scheduler, steps)
    count = int((scheduler.timesteps < cutoff(scheduler, fraction)).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1
    start = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def check_refine(pipeline: dict, refine: float | None, aesthetic_score: float | None,
                 negative_aesthetic_score: float | None) -> None:
    if refine is None:
        if aesthetic_score is not None or negative_aesthetic_score is not None:
            raise InvalidInputError("aesthetic_score and negative_aesthetic_score condition the SDXL refiner: give "
                                    "refine too")
        return
    if REFINER not in pipeline["unets"]:
        raise InvalidInputError(f"refine needs an SDXL refiner in the model family (`ti2i export --model "
                                f"REFINER --out` the base's engine directory); it has {sorted(pipeline['unets'])}")
    shared.check_range("refine", refine, 0.0, 1.0, low_open=True)


def refine_latents(runner: Runner, latents: torch.Tensor, prompt: str, negative_prompt: str | None, steps: int,
                   fraction: float, guidance: float, scheduler_name: str, seed: int, generator: torch.Generator,
                   eta: float, sizes: shared.SizeConditioning, aesthetic_score: float | None,
                   negative_aesthetic_score: float | None, timings: Timings, progress: shared.Progress
                   ) -> torch.Tensor:
    """The base's latents at the handoff, denoised to the end by the refiner (its own scheduler and text)."""
    pipeline = runner.pipeline
    facts = shared.unet_facts(pipeline, REFINER)
    do_cfg = guidance > 1.0
    factor = pipeline["vae_scale_factor"]
    height, width = latents.shape[-2] * factor, latents.shape[-1] * factor

    # 1. Encode the prompt: the base's graph, the refiner's way with an empty negative prompt; its text is the
    #    second encoder's part (the refiner UNet's width)
    with timings.stage("encode_prompt"):
        embeds, added = shared.encode_prompt_cfg(runner, prompt, negative_prompt, do_cfg,
                                                 facts.get("force_zeros_for_empty_prompt", False))
    embeds = embeds[..., -facts["text_width"]:]

    # 2. Size and aesthetic conditioning: [negative score, score] with guidance
    scores = [aesthetic_score if aesthetic_score is not None else AESTHETIC_SCORE]
    if do_cfg:
        negative = negative_aesthetic_score
        scores.insert(0, negative if negative is not None else NEGATIVE_AESTHETIC_SCORE)
    added = shared.size_conditions(added, height, width, sizes, scores)

    # 3. Timesteps: the rest of its own schedule
    scheduler = shared.make_scheduler(pipeline, REFINER, scheduler_name, seed)
    timesteps = refiner_timesteps(scheduler, steps, fraction)

    # 4. Denoising loop: the base's latents as they are (no noise added)
    extra = shared.step_kwargs(scheduler, generator, eta)
    for t in shared.progress_steps(timesteps, "refine", progress):
        with timings.stage("unet"):
            noise_pred = shared.guided_noise_pred(runner, REFINER, scheduler, latents, t, embeds, guidance, do_cfg,
                                                  **added)
        latents = scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
    return latents
