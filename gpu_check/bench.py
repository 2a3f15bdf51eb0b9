"""The short GPU benchmark of `make gpu-check`: ms per denoiser call (a CFG step at batch 2), side by side.

    python -m gpu_check.bench [--out gpu_check/results.json] [--no-tensorrt] [--no-svd]

Always (torch + CUDA only): the small SD-like block stack of `blocks.py` in torch eager fp32 and fp16
and as an AOTInductor fp16 package. Where diffusers is installed (the container): the SD 1.5 UNet
architecture (random weights: timing does not depend on them) at 512² (64² latent), batch 2, in
torch eager fp16, AOTInductor fp16 and, with TensorRT installed, a static fp16 plan; and one SVD-XT
UNet step (25 frames, 576×1024) in eager fp16. Timed with CUDA events, median of the repeats,
after warm-up. Compare with EXPECTED.md; every figure is printed with the machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gpu_check import _path  # noqa: F401

import torch  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def cuda_ms(fn: Callable[[], object], warmup: int = 5, repeats: int = 30) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def aoti_package(module: torch.nn.Module, args: tuple, where: Path) -> tuple[Callable, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        program = torch.export.export(module, args, strict=False)
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(where))
    runner = torch._inductor.aoti_load_package(path)
    return runner, time.perf_counter() - start


def tensorrt_plan(module: torch.nn.Module, args: tuple, names: list[str], where: Path):
    from ti2i.engines.tensorrt import TrtEngine
    from ti2i.export.tensorrt import TIMING_CACHE, _build, require_tensorrt
    from ti2i.spec import ComponentSpec, TensorSpec

    trt = require_tensorrt()
    start = time.perf_counter()
    onnx_path = where / "unet.onnx"
    with torch.inference_mode():
        torch.onnx.export(module, args, str(onnx_path), input_names=names, output_names=["noise_pred"],
                          opset_version=17, dynamo=False)
    prof = {n: (tuple(a.shape),) * 3 for n, a in zip(names, args)}
    _build(trt, onnx_path, prof, where / "unet.plan", where / TIMING_CACHE)
    dtype = {torch.float16: "float16", torch.float32: "float32"}
    spec = ComponentSpec("unet", tuple(TensorSpec(n, dtype[a.dtype], tuple(a.shape)) for n, a in zip(names, args)),
                         (TensorSpec("noise_pred", "float16", tuple(args[0].shape)),), {}, batched=False)
    engine = TrtEngine(where / "unet.plan", spec, prof)
    feed = dict(zip(names, args))
    return (lambda: engine.run_device(feed)), time.perf_counter() - start


def machine() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda}


def bench_block(results: dict, tmp: Path) -> None:
    from gpu_check.blocks import TinyDenoiser

    torch.manual_seed(0)
    module = TinyDenoiser().eval().cuda()
    args32 = (torch.randn(2, 4, 64, 64, device="cuda"), torch.full((2,), 500.0, device="cuda"),
              torch.randn(2, 77, 64, device="cuda"))
    half = TinyDenoiser().eval().cuda().half()
    half.load_state_dict(module.state_dict())
    args16 = (args32[0].half(), args32[1], args32[2].half())
    with torch.inference_mode():
        results["block eager fp32"] = cuda_ms(lambda: module(*args32))
        results["block eager fp16"] = cuda_ms(lambda: half(*args16))
    runner, compile_s = aoti_package(half, args16, tmp / "block.pt2")
    results["block aoti fp16"] = cuda_ms(lambda: runner(*args16))
    results["block aoti compile s"] = compile_s


def bench_sd15(results: dict, tmp: Path, with_tensorrt: bool) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**SD15_UNET).eval().cuda().half()

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    module = Wrapped().eval()
    args = (torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16), torch.full((2,), 500.0, device="cuda"),
            torch.randn(2, 77, 768, device="cuda", dtype=torch.float16))
    with torch.inference_mode():
        results["sd15 unet eager fp16 (ms per CFG step)"] = cuda_ms(lambda: module(*args))
    runner, compile_s = aoti_package(module, args, tmp / "sd15.pt2")
    results["sd15 unet aoti fp16 (ms per CFG step)"] = cuda_ms(lambda: runner(*args))
    results["sd15 unet aoti compile s"] = compile_s
    if with_tensorrt and importlib.util.find_spec("tensorrt") is not None:
        run, build_s = tensorrt_plan(module, args, ["sample", "timestep", "encoder_hidden_states"], tmp)
        results["sd15 unet tensorrt fp16 static (ms per CFG step)"] = cuda_ms(run)
        results["sd15 unet tensorrt build s"] = build_s
    else:
        results["sd15 unet tensorrt"] = "skipped: TensorRT is not installed" if with_tensorrt else "skipped"


def bench_svd_xt(results: dict) -> None:
    from diffusers import UNetSpatioTemporalConditionModel

    unet = UNetSpatioTemporalConditionModel(num_frames=25).eval().cuda().half()
    sample = torch.randn(2, 25, 8, 72, 128, device="cuda", dtype=torch.float16)
    timestep = torch.full((2,), 0.5, device="cuda")
    context = torch.randn(2, 1, 1024, device="cuda", dtype=torch.float16)
    ids = torch.tensor([[6.0, 127.0, 0.02]] * 2, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        step = cuda_ms(lambda: unet(sample, timestep, context, ids, return_dict=False), warmup=2, repeats=5)
    results["svd-xt unet eager fp16 (ms per CFG step, 25 frames 576x1024)"] = step
    results["svd-xt 25 steps, UNet only (s)"] = step * 25 / 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--no-tensorrt", action="store_true")
    parser.add_argument("--no-svd", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"gpu-check bench: skipped: no CUDA GPU visible to torch {torch.__version__}")
        return 0
    results: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        bench_block(results, Path(tmp))
        if importlib.util.find_spec("diffusers") is None:
            results["sd15 / svd-xt"] = "skipped: diffusers is not installed (the container has it)"
        else:
            bench_sd15(results, Path(tmp), not args.no_tensorrt)
            if not args.no_svd:
                bench_svd_xt(results)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
