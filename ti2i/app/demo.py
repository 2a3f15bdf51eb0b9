"""`make demo`: the whole path on a tiny random-weight model, through a real Triton server.

tiny models -> ONNX export (validated) -> one Triton model repository -> one bundled tritonserver
on 127.0.0.1 -> each method through the gRPC client -> outputs/, with per-stage latencies; then one
edit as a single request to its served method model; last, that edit in-process on ONNX Runtime and on
OpenVINO side by side (times and PSNR). The image methods share one engine directory;
SVD (its own VAE, no text encoder) has its own. Both are served by the same server as two model
families (``sd.*`` and ``svd.*``); each method finds its family.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from PIL import Image

from ti2i.client.images import centered_ellipse_mask, psnr
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.results import ImageResult, VideoResult
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.client.video import write_video
from ti2i.engines.loader import describe_choice, engine_choice
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_tiny_model
from ti2i.triton_models.families import write_family_repository
from ti2i.triton_models.server import TritonServer

DEMO_IMAGE = Path("examples/input.png")


Requests = dict[str, dict[str, Any]]  # method -> its inputs and parameters (the rest: the record's defaults)


def _sd_methods(image: Path) -> Requests:
    """Each method on SD 1.x components with its reference defaults, on the example image."""
    with Image.open(image) as opened:
        mask = centered_ellipse_mask(opened.size)
    return {
        # the tiny model's default size is 64×64: ask for the example's 256×256
        "txt2img": dict(prompt="a watercolor painting of hills at sunset", height=256, width=256),
        "sdedit": dict(image=image, prompt="a watercolor painting of hills at sunset"),
        "pix2pix": dict(image=image, prompt="make it a snowy winter evening"),
        "cyclediffusion": dict(image=image, prompt="a painting of mountains at night",
                               source_prompt="a picture of hills at sunset"),
        "inpaint": dict(image=image, mask=mask, prompt="a full moon over the hills", height=256, width=256),
        "ddib": dict(image=image, prompt="a painting of mountains at night",
                     source_prompt="a picture of hills at sunset"),
        # 16 frames at 128×128 and 25 steps keep the CPU demo short
        "videoldm": dict(image=image, prompt="hills at sunset, clouds drifting", steps=25, height=128, width=128),
    }


def _svd_methods(image: Path) -> Requests:
    """Image-to-video at 256×256 (the reference default, 576×1024, is slow on a CPU), the model's 8 frames."""
    return {"svd": dict(image=image, height=256, width=256)}


def _target(method: str) -> str:
    return f"{method}.{'mp4' if METHODS[method].output == 'video' else 'png'}"


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
    remote = "sdedit"  # one edit also as one request to its method model
    repository = write_family_repository({"sd": sd_engines, "svd": svd_engines}, work / "repository",
                                         methods={"sd": [remote]})
    requests = {**_sd_methods(image), **_svd_methods(image)}
    start = time.perf_counter()
    with TritonServer(repository, log_path=work / "tritonserver.log") as server:
        print(f"ready in {time.perf_counter() - start:.1f} s: grpc {server.grpc_url}, http {server.http_url}")
        with TritonRunner(f"grpc://{server.grpc_url}", api_key=server.api_key) as runner:
            for method, request in requests.items():
                print(f"== {method} over gRPC")
                target = _target(method)
                result = METHODS[method](runner, progress=True, **request)
                save(result, out / target)
                print(result.timings.report())
                print(f"wrote {out / target}")
        print(f"== {remote} as one request to the served `sd.{remote}` method model (progress streamed)")
        result = run_remote(f"grpc://{server.grpc_url}", METHODS[remote], family="sd", **requests[remote])
        save(result, out / f"{remote}-remote.png")
        print(f"wrote {out / f'{remote}-remote.png'} ({result.timings.summary()['remote']['total_s']:.2f} s)")
    print("== server stopped")
    compare_engines(sd_engines.root, remote, requests[remote], out)
    return 0


def compare_engines(engine_dir: Path, method: str, request: dict[str, Any], out: Path) -> None:
    """The method in-process on ONNX Runtime (the exact fp32 default) and on OpenVINO (bf16 where this CPU has
    the units): each timed after one warm-up run (OpenVINO compiles then), and the PSNR between the two."""
    choice = engine_choice("openvino")
    print(f"== {method} in-process on ort and on {describe_choice(choice)}")
    results = {}
    for name, options in (("ort", {}), ("openvino", choice)):
        with InProcessRunner(engine_dir, **options) as runner:
            METHODS[method](runner, progress=False, **request)
            start = time.perf_counter()
            results[name] = METHODS[method](runner, progress=False, **request)
            print(f"{name}: {time.perf_counter() - start:.2f} s")
    save(results["openvino"], out / f"{method}-openvino.png")
    print(f"PSNR openvino {choice['precision']} vs ort fp32: "
          f"{psnr(results['openvino'].array, results['ort'].array):.1f} dB; wrote {out / f'{method}-openvino.png'}")


def save(result: ImageResult | VideoResult, target: Path) -> None:
    if isinstance(result, VideoResult):
        write_video(result.frames, target, result.fps)
    else:
        result.image.save(target)
