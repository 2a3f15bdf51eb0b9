"""Checks that need a CUDA GPU: AOTInductor packages on CUDA (fp16 and fp32), loops on the device,
TensorRT plans (where TensorRT is installed) and, where diffusers and ONNX Runtime are installed (the
container), the tiny pipelines end to end on fp16 TensorRT and AOTInductor engines."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from gpu_check.blocks import TinyDenoiser, denoiser_spec
from gpu_check.conftest import have
from ti2i.engines import profiles
from ti2i.spec import BATCH, sample_inputs

pytestmark = pytest.mark.gpu
FP16_TOLERANCE = 2e-2  # the components' fp16 tolerance (export/components.py)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def module32():
    torch.manual_seed(0)
    return TinyDenoiser().eval()


def _inputs(spec, batch=2, seed=0):
    return sample_inputs(spec.interface(), {BATCH: batch, "height": 64, "width": 64}, seed=seed)


def _reference(module32, inputs) -> np.ndarray:
    with torch.inference_mode():
        return module32(*(torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
                        ).numpy()


@pytest.fixture(scope="module")
def aoti_fp16_package(module32, tmp_path_factory):
    """(package path, spec, latent multiple) of the block stack compiled in fp16 for CUDA."""
    from ti2i.export.aoti import _export

    spec = denoiser_spec("float16")
    prof = profiles.profile(spec)
    module = TinyDenoiser().eval()
    module.load_state_dict(module32.state_dict())
    module = module.half().cuda()
    program, multiple = _export(module, spec, prof, "cuda", dynamic=True)
    path = tmp_path_factory.mktemp("aoti") / "unet.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path, spec, multiple


@pytest.fixture(scope="module")
def aoti_fp16(aoti_fp16_package):
    from ti2i.engines.aoti import AotiEngine

    path, spec, multiple = aoti_fp16_package
    return AotiEngine(path, spec, profiles.profile(spec), multiple is not None, device="cuda", multiple=multiple)


def test_aoti_fp16_on_cuda_matches_fp32_torch(aoti_fp16, module32):
    for batch in (1, 2, 3):
        inputs = _inputs(aoti_fp16.spec, batch, seed=batch)
        got = aoti_fp16.run(inputs)["noise_pred"]
        assert got.dtype == np.float32 and got.shape == (batch, 4, 64, 64)
        assert _rel(got, _reference(module32, inputs)) <= FP16_TOLERANCE


def test_a_loop_on_the_device_never_leaves_it(aoti_fp16):
    """run_device takes and returns CUDA tensors: a denoising loop of them stays on the GPU."""
    latents = torch.randn((1, 4, 64, 64), generator=torch.Generator("cpu").manual_seed(0)).cuda()
    context = torch.randn((2, 77, 64), device="cuda", dtype=torch.float16)
    for t in (900.0, 500.0, 100.0):
        sample = torch.cat([latents] * 2).half()
        out = aoti_fp16.run_device({"sample": sample, "timestep": torch.full((2,), t, device="cuda"),
                                    "encoder_hidden_states": context})["noise_pred"]
        assert out.is_cuda
        uncond, cond = out.float().chunk(2)
        latents = latents - 0.1 * (uncond + 7.5 * (cond - uncond))
    assert latents.is_cuda and torch.isfinite(latents).all()


DIFFUSERS = pytest.mark.skipif(not have("diffusers"), reason="a method loop needs diffusers (its schedulers): "
                               "carry it with `make gpu-deps-diffusers` (gpu_check/EXPECTED.md)")


@DIFFUSERS
def test_a_method_loop_on_cuda_makes_no_host_copies(aoti_fp16_package, tmp_path, monkeypatch):
    """SDEdit over the in-process runner on AOTInductor CUDA engines (gpu_check/standin.py: the block-stack
    UNet in fp16, stand-in text encoder and VAE): every UNet call takes and returns CUDA tensors on its device
    path, and while the loop runs no tensor is copied to the host (no .cpu(), .numpy(), .item(), .tolist() of
    a CUDA tensor; the synchronizing CUDA calls torch's sync debug mode sees are printed). Its result equals
    the same engines driven step by step through numpy (a host round trip per step): only the scheduler's
    float rounding on the GPU, and where it flips the fp16 rounding of a UNet input, differs."""
    import warnings

    from PIL import Image

    from gpu_check.standin import StandInRunner, write_standin_engines
    from ti2i.client.sdedit import sdedit
    from ti2i.runner import Runner

    package, spec, multiple = aoti_fp16_package
    root = write_standin_engines(tmp_path / "engines", package, spec, multiple, device="cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    options = dict(prompt="a painting", steps=10, strength=0.6, seed=4)
    in_loop, host_copies, unet_calls, steps = [False], [], {"numpy": 0, "device": 0}, [0]

    def watch(name):
        original = getattr(torch.Tensor, name)

        def watched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            if in_loop[0] and self.is_cuda and not (isinstance(out, torch.Tensor) and out.is_cuda):
                host_copies.append((name, tuple(self.shape)))
            return out

        monkeypatch.setattr(torch.Tensor, name, watched)

    for name in ("cpu", "numpy", "item", "tolist", "to"):
        watch(name)

    def progress(loop: str, done: int, total: int) -> None:
        in_loop[0] = done < total
        steps[0] = total
        torch.cuda.set_sync_debug_mode("warn" if in_loop[0] else "default")

    with StandInRunner(root, backend="aoti", device="cuda") as runner:
        unet = runner.engine("unet")
        run, run_device = unet.run, unet.run_device

        def counted_run(inputs):
            unet_calls["numpy"] += in_loop[0]
            return run(inputs)

        def counted_run_device(inputs):
            unet_calls["device"] += in_loop[0]
            assert all(v.is_cuda for v in inputs.values()), {k: v.device for k, v in inputs.items()}
            out = run_device(inputs)
            assert all(v.is_cuda for v in out.values())
            return out

        unet.run, unet.run_device = counted_run, counted_run_device
        with warnings.catch_warnings(record=True) as syncs:
            warnings.simplefilter("always")
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = sdedit(runner, image, progress=progress, **options)
            seconds = time.perf_counter() - start
        torch.cuda.set_sync_debug_mode("default")
        assert (unet_calls["device"], unet_calls["numpy"]) == (steps[0], 0), unet_calls
        assert host_copies == [], f"host copies inside the loop: {host_copies}"
        assert result.latents.shape == (1, 4, 64, 64) and np.isfinite(result.array).all()

        class HostLoop(Runner):  # the same engines, every tensor through numpy: a round trip per step
            pipeline = runner.pipeline

            def run(self, model, /, outputs=None, **inputs):
                return runner.run(model, outputs, **inputs)

        in_loop[0] = False
        start = time.perf_counter()
        host = sdedit(HostLoop(), image, progress=False, **options)
        host_seconds = time.perf_counter() - start
    synced = [str(w.message).splitlines()[0] for w in syncs if "synchroniz" in str(w.message)]
    db = _psnr(result.array, host.array)
    print(f"\nSDEdit stand-in 512², {steps[0]} steps on CUDA: device loop {seconds:.3f} s, host round trips "
          f"{host_seconds:.3f} s; PSNR device vs host loop {db:.1f} dB; synchronizing CUDA calls in the loop "
          f"(torch sync debug mode): {len(synced)}{' e.g. ' + synced[0] if synced else ''}")
    assert db >= 40.0


def test_the_engine_core_batches_loops_on_cuda(aoti_fp16_package, tmp_path):
    """The served path's engine core (`ti2i serve --backend aoti --device cuda`, here without Triton: the same
    `EngineCore` its python model hosts) over the stand-in CUDA engines: one request, then four at once, whose
    UNet calls merge on the device. Prints the seconds per step of the in-process loop, of the core with one
    request and with four (per request), and the merged batch sizes; each core result equals the in-process
    loop's up to fp16 batching (PSNR ≥ 40 dB)."""
    import threading

    from PIL import Image

    from gpu_check.standin import StandInRunner, write_standin_engines
    from ti2i.client.registry import METHODS
    from ti2i.manifest import Manifest
    from ti2i.triton_models.core import CoreOptions, EngineCore

    package, spec, multiple = aoti_fp16_package
    root = write_standin_engines(tmp_path / "engines", package, spec, multiple, device="cuda")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    call = dict(image=image, prompt="a painting", steps=10, strength=0.6)
    steps = int(call["steps"] * call["strength"])
    with StandInRunner(root, backend="aoti", device="cuda") as runner:
        core = EngineCore(root, [METHODS["sdedit"]], list(Manifest.load(root).components),
                          CoreOptions(active=4, backend="aoti", device="cuda"), engines=runner)
        core.load()
        METHODS["sdedit"](runner, **call, seed=0)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        alone = [METHODS["sdedit"](runner, **call, seed=seed).array for seed in range(4)]
        torch.cuda.synchronize()
        in_process = (time.perf_counter() - start) / (4 * steps)

        def served(seed: int) -> np.ndarray:
            out = core.run_method("sdedit", {**call, "seed": seed}, "png", ["pixels"], token=f"t{seed}")
            return out["pixels"][0].astype(np.float32) / 255

        start = time.perf_counter()
        one = served(0)
        core_one = (time.perf_counter() - start) / steps
        results: dict[int, np.ndarray] = {}
        threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, served(s))) for s in range(4)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        core_four = (time.perf_counter() - start) / (4 * steps)
    merged = {samples: n for (model, _, _, samples), n in core.scheduler.executions.items() if model == "unet"}
    print(f"\nSDEdit stand-in 512² on CUDA, s/step: in-process {in_process:.4f}, engine core one request "
          f"{core_one:.4f} ({core_one / in_process:.2f}x), four at once {core_four:.4f} per request; UNet "
          f"samples per execution: {dict(sorted(merged.items()))}")
    assert max(merged) > 2, merged  # four requests' [uncond, cond] pairs merged on the device
    assert _psnr(one, np.round(alone[0] * 255) / 255) >= 40.0
    for seed in range(4):
        assert _psnr(results[seed], np.round(alone[seed] * 255) / 255) >= 40.0, seed


@pytest.mark.skipif(not have("tensorrt"), reason="TensorRT is not installed (pip install 'ti2i[tensorrt]')")
def test_tensorrt_plan_runs_behind_the_engine_interface(module32, tmp_path):
    from ti2i.engines.tensorrt import TrtEngine
    from ti2i.export.tensorrt import TIMING_CACHE, _build, require_tensorrt

    trt = require_tensorrt()
    spec = denoiser_spec("float16")
    module = TinyDenoiser().eval()
    module.load_state_dict(module32.state_dict())
    module = module.half()
    onnx_path = tmp_path / "unet.onnx"
    sample = _inputs(spec)
    args = (torch.from_numpy(sample["sample"]).half(), torch.from_numpy(sample["timestep"]),
            torch.from_numpy(sample["encoder_hidden_states"]).half())
    torch.onnx.export(module.cuda(), tuple(a.cuda() for a in args), str(onnx_path),
                      input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["noise_pred"],
                      dynamic_axes={"sample": {0: "batch"}, "timestep": {0: "batch"},
                                    "encoder_hidden_states": {0: "batch"}, "noise_pred": {0: "batch"}},
                      opset_version=17, dynamo=False)
    prof = profiles.profile(spec)
    _build(trt, onnx_path, prof, tmp_path / "unet.plan", tmp_path / TIMING_CACHE)
    assert (tmp_path / TIMING_CACHE).stat().st_size > 0
    engine = TrtEngine(tmp_path / "unet.plan", spec, prof)
    for batch in (1, 2):
        inputs = _inputs(spec, batch, seed=batch)
        assert _rel(engine.run(inputs)["noise_pred"], _reference(module32, inputs)) <= FP16_TOLERANCE
    static = denoiser_spec("float16")
    static_prof = {k: (v[1], v[1], v[1]) for k, v in prof.items()}
    _build(trt, onnx_path, static_prof, tmp_path / "static.plan", tmp_path / TIMING_CACHE)
    graph_engine = TrtEngine(tmp_path / "static.plan", static, static_prof)
    assert graph_engine.cuda_graph
    inputs = _inputs(spec, 2, seed=5)
    first, again = graph_engine.run(inputs)["noise_pred"], graph_engine.run(inputs)["noise_pred"]  # capture, replay
    np.testing.assert_array_equal(first, again)
    assert _rel(first, _reference(module32, inputs)) <= FP16_TOLERANCE


PIPELINE = pytest.mark.skipif(not (have("diffusers") and have("onnxruntime")),
                              reason="the tiny pipelines need diffusers and onnxruntime (the container has them)")


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory):
    from ti2i.export.exporter import export_model
    from ti2i.export.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("pipeline")
    model = write_tiny_model("sd", root / "sd")
    fp32 = export_model(str(model), root / "e32", log=lambda _: None)
    fp16 = export_model(str(model), root / "e16", log=lambda _: None, precision="fp16")
    return fp32, fp16


def _sdedit(root, **options) -> np.ndarray:
    from PIL import Image

    from ti2i.client.runners import InProcessRunner
    from ti2i.client.sdedit import sdedit

    # 64² (latent 8²): an AOTInductor UNet takes latent sizes in multiples of 8
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    with InProcessRunner(root, **options) as runner:
        return sdedit(runner, image, "a painting", steps=8, seed=3, progress=False).array


def _psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@PIPELINE
@pytest.mark.skipif(not have("tensorrt"), reason="TensorRT is not installed (pip install 'ti2i[tensorrt]')")
def test_sdedit_on_fp16_tensorrt_plans(tiny_engines):
    from ti2i.export.build import build

    fp32, fp16 = tiny_engines
    build(fp16.root, "tensorrt", log=lambda _: None)
    lines = []
    build(fp16.root, "tensorrt", log=lines.append)
    assert all(line.endswith("plan up to date") for line in lines)
    db = _psnr(_sdedit(fp16.root, backend="tensorrt"), _sdedit(fp32.root))
    print(f"\nSDEdit tiny on fp16 TensorRT plans vs fp32 ORT: {db:.1f} dB")
    assert db >= 35.0


@PIPELINE
def test_sdedit_with_an_aoti_cuda_unet(tiny_engines):
    from ti2i.export.build import build

    fp32, fp16 = tiny_engines
    build(fp16.root, "aoti", components="unet", device="cuda", log=lambda _: None)
    db = _psnr(_sdedit(fp16.root, backend="aoti", device="cuda"), _sdedit(fp32.root))
    print(f"\nSDEdit tiny with the fp16 AOTInductor CUDA UNet vs fp32 ORT: {db:.1f} dB")
    assert db >= 35.0


@PIPELINE
def test_run_tensors_keeps_the_unet_on_the_device(tiny_engines):
    from ti2i.client.runners import InProcessRunner
    from ti2i.export.build import build

    _, fp16 = tiny_engines
    build(fp16.root, "aoti", components="unet", device="cuda", log=lambda _: None)
    spec = fp16.components["unet"].spec.interface()
    inputs = sample_inputs(spec, {BATCH: 2, **{d: s for d, s in spec.opt.items() if d != BATCH}})
    with InProcessRunner(fp16.root, backend="aoti", device="cuda") as runner:
        out = runner.run_tensors("unet", **{k: torch.from_numpy(v).cuda() for k, v in inputs.items()})["noise_pred"]
        host = runner.run("unet", **inputs)["noise_pred"]
    assert out.is_cuda and out.dtype == torch.float32
    np.testing.assert_allclose(out.cpu().numpy(), host, rtol=0, atol=1e-3)
