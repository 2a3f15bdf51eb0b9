"""Benchmark backends of the GPU engine path: fp16 graphs, AOTInductor, TensorRT (in-process and served),
and the diffusers pipeline in fp16 on CUDA as their reference.

Each factory raises with the reason where its backend cannot run here (no CUDA, no TensorRT, no
tensorrt backend in the server), so the harness records it as skipped with that reason. Compiled
engines are built on first use into the (cached) engine directory and reused by later runs.
"""

from __future__ import annotations

from pathlib import Path

from ti2i.benchmarks.backends import (
    UNET_OF,
    Backend,
    BenchContext,
    DiffusersBackend,
    RunnerBackend,
    register_backend,
)


def fp16_engine_dir(ctx: BenchContext) -> Path:
    """The method's model exported in fp16 beside its fp32 engines (once; cached like them)."""
    from ti2i.export.exporter import export_model

    out = Path(f"{ctx.engine_dir}-fp16")
    if not (out / "manifest.json").is_file():
        ctx.status(f"exporting fp16 engines to {out}")
        export_model(str(ctx.model_dir), out, log=lambda line: ctx.status(line), precision="fp16")
    return out


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _ort_fp16(name: str, ctx: BenchContext) -> Backend:
    from ti2i.client.runners import InProcessRunner
    from ti2i.engines.ort import default_providers

    root = fp16_engine_dir(ctx)
    providers = list(ctx.providers or default_providers())
    return RunnerBackend(name, ctx, lambda: InProcessRunner(root, providers=providers), "in-process",
                         {"providers": providers, "precision": "fp16"})


def _aoti(name: str, ctx: BenchContext) -> Backend:
    """The method's denoiser as an AOTInductor package (fp16 on CUDA, fp32 on the CPU), the rest on ORT."""
    from ti2i.client.runners import InProcessRunner
    from ti2i.export.build import build

    device = _device()
    root = fp16_engine_dir(ctx) if device == "cuda" else ctx.engine_dir
    unet = UNET_OF[ctx.method]
    ctx.status(f"building the AOTInductor package of {unet} for {device} (once; cached)")
    build(root, "aoti", components=unet, device=device, log=ctx.status)
    return RunnerBackend(name, ctx, lambda: InProcessRunner(root, backend="aoti", device=device), "in-process",
                         {"device": device, "compiled": [unet]})


def _tensorrt(name: str, ctx: BenchContext) -> Backend:
    from ti2i.client.runners import InProcessRunner
    from ti2i.engines.tensorrt import require_tensorrt
    from ti2i.export.build import build

    require_tensorrt()
    root = fp16_engine_dir(ctx)
    build(root, "tensorrt", log=ctx.status)
    return RunnerBackend(name, ctx, lambda: InProcessRunner(root, backend="tensorrt", device="cuda"), "in-process",
                         {"precision": "fp16"})


SERVED_TENSORRT_ENV = "TI2I_TRITON_TENSORRT_URL"


def _served_tensorrt(name: str, ctx: BenchContext) -> Backend:
    """Our loop against a tritonserver serving the plans natively (`ti2i repository --backend tensorrt`, as
    the container does): the bundled CPU server has no tensorrt backend, so the server is given by URL."""
    import os

    from ti2i.client.runners import TritonRunner

    url = os.environ.get(SERVED_TENSORRT_ENV)
    if not url:
        raise RuntimeError(f"set {SERVED_TENSORRT_ENV}=grpc://HOST:PORT to a tritonserver serving the tensorrt "
                           f"repository (the ti2i container serves one); the bundled server has no tensorrt backend")
    return RunnerBackend(name, ctx, lambda: TritonRunner(url), "served", {"url": url, "repository": "tensorrt"})


def _diffusers_fp16(name: str, ctx: BenchContext) -> Backend:
    """The diffusers pipeline in fp16 on CUDA: the reference the fp16 engines are measured against."""
    if not ctx.device.startswith("cuda"):
        raise RuntimeError("diffusers-fp16 runs on CUDA only (fp16 on the CPU is no reference anyone runs)")
    return DiffusersBackend(name, ctx, dtype="float16")


register_backend("ort-fp16", _ort_fp16, description="our loop over fp16 ONNX graphs on ONNX Runtime")
register_backend("aoti", _aoti, description="our loop, the denoiser an AOTInductor package (fp16 on CUDA)")
register_backend("tensorrt", _tensorrt, description="our loop over TensorRT fp16 plans, in-process (GPU)")
register_backend("triton-tensorrt", _served_tensorrt,
                 description="our loop against tritonserver serving the plans natively (tensorrt_plan)")
register_backend("diffusers-fp16", _diffusers_fp16, description="the diffusers pipeline in fp16 on CUDA",
                 holds_model=True)
