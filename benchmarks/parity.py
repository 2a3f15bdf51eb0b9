"""Parity report: every method against its diffusers pipeline, in-process and through a real Triton server.

`python -m ti2i.benchmarks.parity --work DIR` builds the tiny models, exports them, starts one server per
engine directory, runs each method at its reference defaults (steps, guidance, strength) on the
example image at 64×48 with the same seed as the reference, and prints the max |Δ| on the [0, 1]
float output, plus the Video LDM α = 1 reduction, the CycleDiffusion reconstruction and the first-frame
anchor. The tests assert the bounds; this prints the measured figures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ti2i.client import steps as shared
from ti2i.client.cyclediffusion import cyclediffusion
from ti2i.client.images import prepare_image
from ti2i.client.pix2pix import pix2pix
from ti2i.client.runners import InProcessRunner, Runner, TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.svd import svd
from ti2i.client.videoldm import videoldm
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_tiny_model
from ti2i.manifest import Manifest
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"
PROMPT, SOURCE, TARGET = "a photo of a cat", "a cat", "a dog"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def build(work: Path) -> dict[str, Path]:
    """Tiny models and their engine directories (SD methods side by side; SVD apart)."""
    videoldm_model = write_tiny_model("videoldm", work / "model-videoldm")
    models = {"sd": videoldm_model / "sd", "motion_adapter": videoldm_model / "motion_adapter",
              "pix2pix": write_tiny_model("pix2pix", work / "model-pix2pix"),
              "svd": write_tiny_model("svd", work / "model-svd")}
    quiet = lambda _: None  # noqa: E731
    export_model(str(models["sd"]), work / "engines", log=quiet)
    export_model(str(models["pix2pix"]), work / "engines", log=quiet)
    export_model(str(models["sd"]), work / "engines", log=quiet, motion_adapter=str(models["motion_adapter"]))
    export_model(str(models["svd"]), work / "engines-svd", log=quiet)
    return {**models, "engines": work / "engines", "engines-svd": work / "engines-svd"}


def references(paths: dict[str, Path], image: Image.Image) -> dict[str, np.ndarray]:
    """The diffusers pipelines' outputs at their defaults, seed 0."""
    from diffusers import (AnimateDiffVideoToVideoPipeline, CycleDiffusionPipeline, DDIMScheduler, MotionAdapter,
                           StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline,
                           StableVideoDiffusionPipeline, UNetMotionModel)

    no_checker = dict(safety_checker=None, requires_safety_checker=False)
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(str(paths["sd"]), **no_checker)
    instruct = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(paths["pix2pix"]), **no_checker)
    cycle = CycleDiffusionPipeline.from_pretrained(str(paths["sd"]), **no_checker)
    cycle.scheduler = DDIMScheduler.from_config(cycle.scheduler.config)
    video = StableVideoDiffusionPipeline.from_pretrained(str(paths["svd"]))
    adapter = MotionAdapter.from_pretrained(str(paths["motion_adapter"]))
    animatediff = AnimateDiffVideoToVideoPipeline(
        vae=img2img.vae, text_encoder=img2img.text_encoder, tokenizer=img2img.tokenizer,
        unet=UNetMotionModel.from_unet2d(img2img.unet, adapter), motion_adapter=adapter, scheduler=img2img.scheduler)
    for pipe in (img2img, instruct, cycle, video, animatediff):
        pipe.set_progress_bar_config(disable=True)
    size = dict(height=image.height, width=image.width)
    return {
        "sdedit": img2img(PROMPT, image=image, generator=_generator(0), output_type="np").images[0],
        "pix2pix": instruct("make it snowy", image=image, generator=_generator(0), output_type="np").images[0],
        "cyclediffusion": cycle(prompt=TARGET, source_prompt=SOURCE, image=image, generator=_generator(0),
                                output_type="np").images[0],
        "svd": video(image, num_frames=8, generator=_generator(0), output_type="np", **size).frames[0],
        "videoldm": animatediff(video=[image] * 8, prompt=PROMPT, generator=_generator(0), output_type="np",
                                **size).frames[0],
    }


def methods(image: Image.Image) -> dict[str, Callable[[Runner], np.ndarray]]:
    """Ours at the same defaults and seed (Video LDM at α = 0 without anchoring, as the reference)."""
    size = dict(height=image.height, width=image.width)
    return {
        "sdedit": lambda r: sdedit(r, image, PROMPT, progress=False).array,
        "pix2pix": lambda r: pix2pix(r, image, "make it snowy", progress=False).array,
        "cyclediffusion": lambda r: cyclediffusion(r, image, TARGET, SOURCE, progress=False).array,
        "svd": lambda r: svd(r, image, frames=8, progress=False, **size).array,
        "videoldm": lambda r: videoldm(r, image, PROMPT, frames=8, alpha=0.0, anchor_first_frame=False,
                                       progress=False, **size).array,
    }


def properties(engines: Path, image: Image.Image, server: TritonServer) -> dict[str, float]:
    out: dict[str, float] = {}
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 4, 8, 6, 8)).astype(np.float32)
    timestep = np.full(2, 500.0, np.float32)
    embeds = rng.standard_normal((2, 77, 32)).astype(np.float32)
    for label, runner in (("in_process", InProcessRunner(engines)), ("triton_grpc", TritonRunner(
            f"grpc://{server.grpc_url}"))):
        with runner:
            per_frame = np.stack([runner.run("unet", sample=np.ascontiguousarray(sample[:, :, f]), timestep=timestep,
                                             encoder_hidden_states=embeds)["noise_pred"] for f in range(8)], axis=2)
            for alpha in (1.0, 0.0):
                video = runner.run("unet_motion", sample=sample, timestep=timestep, encoder_hidden_states=embeds,
                                   alpha=np.full(2, alpha, np.float32))["noise_pred"]
                out[f"videoldm_unet_alpha{alpha:g}_vs_image_unet_per_frame_{label}"] = _max_abs(video, per_frame)
    with InProcessRunner(engines) as runner:
        pixels = prepare_image(image, None, None, runner.pipeline["vae_scale_factor"])
        mean, logvar = shared.encode_image(runner, pixels)
        scale = runner.pipeline["vae_scaling_factor"]
        for steps in (10, 50):
            code = cyclediffusion(runner, image, SOURCE, SOURCE, steps=steps, guidance=4.0, source_guidance=4.0,
                                  seed=4, progress=False)
            x0 = scale * shared.sample_posterior(mean, logvar, _generator(4))
            out[f"cyclediffusion_reconstruction_{steps}_steps"] = float((code.latents - x0).abs().max())
        anchored = videoldm(runner, image, PROMPT, frames=8, steps=20, seed=7, progress=False)
        clean = scale * shared.sample_posterior(mean.expand(8, -1, -1, -1), logvar.expand(8, -1, -1, -1),
                                                _generator(7))
        out["videoldm_anchor_frame0_vs_input_latent"] = float((anchored.latents[0, :, 0] - clean[0]).abs().max())
    return out


def report(work: Path) -> dict:
    paths = build(work)
    image = Image.open(EXAMPLE).convert("RGB").resize((64, 48), Image.LANCZOS)
    expected = references(paths, image)
    result: dict = {"parity_max_abs_error": {}}
    sd_repo = write_repository(Manifest.load(paths["engines"]), work / "repository")
    svd_repo = write_repository(Manifest.load(paths["engines-svd"]), work / "repository-svd")
    with TritonServer(sd_repo) as sd_server, TritonServer(svd_repo) as svd_server:
        for name, run in methods(image).items():
            engines, server = (paths["engines-svd"], svd_server) if name == "svd" else (paths["engines"], sd_server)
            with InProcessRunner(engines) as runner:
                local = run(runner)
            row = {"in_process": _max_abs(local, expected[name])}
            for protocol, url in (("triton_grpc", server.grpc_url), ("triton_http", server.http_url)):
                with TritonRunner(f"{protocol[7:]}://{url}") as runner:
                    served = run(runner)
                row[protocol] = _max_abs(served, expected[name])
                row[f"{protocol}_vs_in_process"] = _max_abs(served, local)
            result["parity_max_abs_error"][name] = row
        result["properties"] = properties(paths["engines"], image, sd_server)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work/parity"))
    args = parser.parse_args()
    print(json.dumps(report(args.work), indent=1))


if __name__ == "__main__":
    main()
