"""`make demo`: the whole path on a tiny random-weight model, through a real Triton server.

tiny models -> ONNX export (validated) -> one Triton model repository -> one bundled tritonserver
on 127.0.0.1 -> each method through the gRPC client -> outputs/, with per-stage latencies. The image
methods share one engine directory; SVD (its own VAE, no text encoder) has its own. Both are served
by the same server as two model families (``sd.*`` and ``svd.*``); each method finds its family.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

from ti2i.client.cyclediffusion import cyclediffusion
from ti2i.client.ddib import ddib
from ti2i.client.inpaint import inpaint
from ti2i.client.pix2pix import pix2pix
from ti2i.client.results import ImageResult, VideoResult
from ti2i.client.runners import Runner, TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.svd import svd
from ti2i.client.txt2img import txt2img
from ti2i.client.video import write_video
from ti2i.client.videoldm import videoldm
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_tiny_model
from ti2i.triton_models.families import write_family_repository
from ti2i.triton_models.server import TritonServer

DEMO_IMAGE = Path("examples/input.png")


Method = tuple[str, Callable[[Runner], ImageResult | VideoResult]]


def demo_mask(size: tuple[int, int]) -> Image.Image:
    """White (repaint) ellipse in the middle of a black (keep) mask."""
    width, height = size
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=255)
    return mask


def _sd_methods(image: Path) -> dict[str, Method]:
    """Each method on SD 1.x components with its reference defaults, on the example image."""
    with Image.open(image) as opened:
        mask = demo_mask(opened.size)
    return {
        # the tiny model's default size is 64×64: ask for the example's 256×256
        "txt2img": ("txt2img.png", lambda r: txt2img(r, "a watercolor painting of hills at sunset", seed=0,
                                                     height=256, width=256)),
        "sdedit": ("sdedit.png", lambda r: sdedit(r, image, "a watercolor painting of hills at sunset", seed=0)),
        "pix2pix": ("pix2pix.png", lambda r: pix2pix(r, image, "make it a snowy winter evening", seed=0)),
        "cyclediffusion": ("cyclediffusion.png", lambda r: cyclediffusion(
            r, image, "a painting of mountains at night", "a picture of hills at sunset", seed=0)),
        "inpaint": ("inpaint.png", lambda r: inpaint(r, image, mask, "a full moon over the hills", seed=0,
                                                     height=256, width=256)),
        "ddib": ("ddib.png", lambda r: ddib(r, image, "a painting of mountains at night",
                                            "a picture of hills at sunset")),
        # 16 frames at 128×128 and 25 steps keep the CPU demo short
        "videoldm": ("videoldm.mp4", lambda r: videoldm(r, image, "hills at sunset, clouds drifting", steps=25,
                                                         height=128, width=128, seed=0)),
    }


def _svd_methods(image: Path) -> dict[str, Method]:
    """Image-to-video at 256×256 (the reference default, 576×1024, is slow on a CPU), the model's 8 frames."""
    return {"svd": ("svd.mp4", lambda r: svd(r, image, height=256, width=256, seed=0))}


def run_demo(work: Path, out: Path, image: Path = DEMO_IMAGE) -> int:
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    print("== 1. tiny random-weight models (offline): SD + a motion adapter, InstructPix2Pix, SD inpainting, "
          "Stable Video Diffusion")
    videoldm_model = write_tiny_model("videoldm", work / "model-videoldm")  # sd/ and motion_adapter/
    models = {kind: write_tiny_model(kind, work / f"model-{kind}") for kind in ("pix2pix", "inpaint", "svd")}

    print("== 2. ONNX export, validated against torch")
    # The SD components, the 8- and 9-channel UNets and the temporal UNet side by side (one text encoder and VAE)
    export_model(str(videoldm_model / "sd"), work / "engines")
    export_model(str(models["pix2pix"]), work / "engines")
    export_model(str(models["inpaint"]), work / "engines")
    sd_engines = export_model(str(videoldm_model / "sd"), work / "engines",
                              motion_adapter=str(videoldm_model / "motion_adapter"))
    svd_engines = export_model(str(models["svd"]), work / "engines-svd")  # its own VAE and image encoder

    print("== 3. one Triton model repository and server for every method: families sd (SD 1.x) and svd")
    repository = write_family_repository({"sd": sd_engines, "svd": svd_engines}, work / "repository")
    start = time.perf_counter()
    with TritonServer(repository, log_path=work / "tritonserver.log") as server:
        print(f"ready in {time.perf_counter() - start:.1f} s: grpc {server.grpc_url}, http {server.http_url}")
        with TritonRunner(f"grpc://{server.grpc_url}", api_key=server.api_key) as runner:
            for method, (target, run) in {**_sd_methods(image), **_svd_methods(image)}.items():
                print(f"== {method} over gRPC")
                result = run(runner)
                save(result, out / target)
                print(result.timings.report())
                print(f"wrote {out / target}")
    print("== server stopped")
    return 0


def save(result: ImageResult | VideoResult, target: Path) -> None:
    if isinstance(result, VideoResult):
        write_video(result.frames, target, result.fps)
    else:
        result.image.save(target)
