"""`make demo`: the whole path on a tiny random-weight model, through a real Triton server.

tiny model -> ONNX export (validated) -> Triton model repository -> bundled tritonserver on
127.0.0.1 -> each method through the gRPC client -> outputs/, with per-stage latencies.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ti2i.client.cyclediffusion import cyclediffusion
from ti2i.client.pix2pix import pix2pix
from ti2i.client.results import ImageResult
from ti2i.client.runners import Runner, TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_tiny_model
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

DEMO_IMAGE = Path("examples/input.png")


def _methods(image: Path) -> dict[str, Callable[[Runner], ImageResult]]:
    """Each method with its reference defaults, on the example image."""
    return {
        "sdedit": lambda r: sdedit(r, image, "a watercolor painting of hills at sunset", seed=0),
        "pix2pix": lambda r: pix2pix(r, image, "make it a snowy winter evening", seed=0),
        "cyclediffusion": lambda r: cyclediffusion(r, image, "a painting of mountains at night",
                                                   "a picture of hills at sunset", seed=0),
    }


def run_demo(work: Path, out: Path, image: Path = DEMO_IMAGE) -> int:
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    print("== 1. tiny random-weight Stable Diffusion and InstructPix2Pix models (offline)")
    sd_model = write_tiny_model("sd", work / "model-sd")
    pix2pix_model = write_tiny_model("pix2pix", work / "model-pix2pix")

    print("== 2. ONNX export, validated against torch (one engine directory, shared text encoder and VAE)")
    export_model(str(sd_model), work / "engines")
    manifest = export_model(str(pix2pix_model), work / "engines")

    print("== 3. Triton model repository")
    repository = write_repository(manifest, work / "model_repository")
    print(f"wrote {repository}")

    print("== 4. tritonserver on 127.0.0.1")
    start = time.perf_counter()
    with TritonServer(repository, log_path=work / "tritonserver.log") as server:
        print(f"ready in {time.perf_counter() - start:.1f} s: grpc {server.grpc_url}, http {server.http_url}")
        with TritonRunner(f"grpc://{server.grpc_url}") as runner:
            for step, (name, method) in enumerate(_methods(image).items(), start=5):
                print(f"== {step}. {name} over gRPC")
                result = method(runner)
                target = out / f"{name}.png"
                result.image.save(target)
                print(result.timings.report())
                print(f"wrote {target}")
    print("== server stopped")
    return 0
