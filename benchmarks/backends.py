"""Benchmark backends: a small registry of names -> factories of things that run one whole request.

A backend runs a method's request end to end and reports the per-stage times of that request.
Two families exist:

* runner backends (``ort``, ``triton-grpc``, ``triton-http``, ``triton-grpc-shm``): our method loops
  over a `Runner`; the method records its own stage timings. They can also hand out fresh runners
  (the concurrency sweep gives one to each client) and run single UNet calls.
* reference backends (``diffusers``, ``diffusers-compile``): the diffusers pipeline the method
  reproduces, with the pipeline's components wrapped by timers that record the same stages.

A later backend (TensorRT engines in-process, say) registers itself with `register_backend` and
the harness measures it like the others, without any change to the harness.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ti2i.benchmarks.presets import Request
from ti2i.client.registry import METHODS
from ti2i.runner import Runner

PROMPT = "a watercolor painting of rolling hills"
SOURCE_PROMPT = "a photo of rolling hills"  # CycleDiffusion's description of the input
NEGATIVE_PROMPT = ""
IMAGE_GUIDANCE = 1.5  # InstructPix2Pix s_I
SOURCE_GUIDANCE = 1.0  # CycleDiffusion
ETA = 0.1  # CycleDiffusion
MIN_GUIDANCE = 1.0  # SVD


@dataclass
class RunRecord:
    """One request: its end-to-end time, each stage's calls (seconds) and the output ([0, 1] floats)."""

    end_to_end_s: float
    stages: dict[str, list[float]]
    output: np.ndarray | None = None


@dataclass
class BenchContext:
    """What a backend factory gets: the method, its request and where models, engines and the server are."""

    method: str
    request: Request
    engine_dir: Path
    model_dir: Path  # the diffusers folder the engines were exported from
    server: Any = None  # a started TritonServer when a served backend is measured
    device: str = "cpu"  # where the reference pipeline runs ("cuda" when torch sees a GPU)
    providers: Sequence[str] | None = None  # ONNX Runtime providers of in-process engines (default: best available)
    status: Callable[[str], None] = lambda text: None  # progress: "backend · model"
    shared: dict[str, Any] = field(default_factory=dict)  # objects backends of one method share (pipelines)


class Backend(ABC):
    """Runs whole requests of one method. `kind` is "reference", "in-process" or "served"."""

    kind = "in-process"

    def __init__(self, name: str, ctx: BenchContext):
        self.name = name
        self.ctx = ctx

    @abstractmethod
    def run(self, image: Image.Image, seed: int) -> RunRecord:
        """Run one request on `image`; return its timings (and output)."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class BackendInfo:
    name: str
    factory: Callable[[str, BenchContext], Backend]
    needs_server: bool = False
    description: str = ""
    method_model: bool = False  # the server must serve the method's model (through the engine core)
    holds_model: bool = False  # loads the diffusers model folder's weights in this process (else our engines)


BACKENDS: dict[str, BackendInfo] = {}


def register_backend(name: str, factory: Callable[[str, BenchContext], Backend], *, needs_server: bool = False,
                     description: str = "", method_model: bool = False, holds_model: bool = False) -> None:
    """Make `name` measurable by `ti2i bench --backends`: `factory(name, ctx)` builds the backend."""
    BACKENDS[name] = BackendInfo(name, factory, needs_server, description, method_model, holds_model)


# --- our method loops over a runner ------------------------------------------------------------------

def method_kwargs(method: str, image: Image.Image, req: Request, seed: int) -> dict[str, Any]:
    """The inputs and parameters of `method`'s benchmark request, by our parameter names (its record's)."""
    from ti2i.client.images import centered_ellipse_mask

    record = METHODS[method]
    values: dict[str, Any] = {
        "image": image, "mask": centered_ellipse_mask(image.size), "prompt": PROMPT,
        "negative_prompt": NEGATIVE_PROMPT or None, "source_prompt": SOURCE_PROMPT, "strength": req.strength,
        "steps": req.steps, "guidance": req.guidance, "image_guidance": IMAGE_GUIDANCE,
        "source_guidance": SOURCE_GUIDANCE, "eta": ETA, "min_guidance": MIN_GUIDANCE, "max_guidance": req.guidance,
        "frames": req.frames or None, "decode_chunk_size": req.decode_chunk_size or None, "seed": seed,
        "height": req.height, "width": req.width,
    }
    names = {*record.images, *(p.name for p in record.params)}
    return {k: v for k, v in values.items() if k in names}


def run_method(method: str, runner: Runner, image: Image.Image, req: Request, seed: int) -> tuple[Any, np.ndarray]:
    """Our implementation of `method` on `runner`: (the Timings it recorded, its float output)."""
    result = METHODS[method](runner, **method_kwargs(method, image, req, seed))
    return result.timings, result.array


UNET_OF = {name: record.unet for name, record in METHODS.items()}


class _ReportingRunner(Runner):
    """Passes calls through, telling the progress display which model runs."""

    def __init__(self, runner: Runner, label: str, status: Callable[[str], None]):
        self.inner = runner
        self.pipeline = runner.pipeline
        self._label = label
        self._status = status
        self._calls: dict[str, int] = {}
        self.first_inputs: dict[str, dict[str, np.ndarray]] = {}  # each model's first inputs, for single calls

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        self._calls[model] = self._calls.get(model, 0) + 1
        if model not in self.first_inputs:
            self.first_inputs[model] = {k: np.array(v, copy=True) for k, v in inputs.items()}
        self._status(f"{self._label} · {model} #{self._calls[model]}")
        return self.inner.run(model, outputs, **inputs)

    def reset(self) -> None:
        self._calls.clear()

    def close(self) -> None:
        self.inner.close()


class RunnerBackend(Backend):
    """Our method loop over a runner that `make_runner()` builds (one for the repeats, fresh ones on demand)."""

    def __init__(self, name: str, ctx: BenchContext, make_runner: Callable[[], Runner], kind: str,
                 details: Mapping[str, Any] | None = None):
        super().__init__(name, ctx)
        self.kind = kind
        self.make_runner = make_runner
        self._details = dict(details or {})
        self.runner = _ReportingRunner(make_runner(), name, ctx.status)

    def run(self, image: Image.Image, seed: int) -> RunRecord:
        self.runner.reset()
        start = time.perf_counter()
        timings, array = run_method(self.ctx.method, self.runner, image, self.ctx.request, seed)
        elapsed = time.perf_counter() - start
        return RunRecord(elapsed, {k: list(v) for k, v in timings.samples.items()}, array)

    def new_client(self) -> _LoopClient:
        """A fresh runner running whole requests (one per client thread of the concurrency sweep)."""
        return _LoopClient(self.ctx, self.make_runner())

    def unet_call(self, inputs: Mapping[str, np.ndarray]) -> float:
        """Seconds of one UNet call with exactly these inputs."""
        start = time.perf_counter()
        self.runner.inner.run(UNET_OF[self.ctx.method], **inputs)
        return time.perf_counter() - start

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self._details}

    def close(self) -> None:
        self.runner.close()


def load_engines(runner: Any, method: str) -> None:
    """Load the engines of an in-process runner that `method` calls."""
    from ti2i.client.methods import components_for

    for name in components_for([method], runner.manifest.components):
        if name in runner.manifest.components:
            runner.engine(name)


class _LoopClient:
    """One client of the concurrency sweep: our loop over its own runner, ready before the clock starts
    (a served runner's configs fetched, an in-process runner's engines loaded: the sweep's first requests
    once spent up to 2 s loading the ONNX sessions of 8 fresh in-process runners at once)."""

    def __init__(self, ctx: BenchContext, runner: Runner):
        self.ctx, self.runner = ctx, runner
        for model in METHODS[ctx.method].models:
            if hasattr(runner, "model_config"):
                runner.model_config(model)
        if getattr(runner, "manifest", None) is not None and hasattr(runner, "engine"):
            load_engines(runner, ctx.method)  # an in-process runner of one engine directory

    def __call__(self, image: Image.Image, seed: int) -> None:
        run_method(self.ctx.method, self.runner, image, self.ctx.request, seed)

    def close(self) -> None:
        self.runner.close()


class MethodBackend(Backend):
    """One request per edit to the served method model: the loop runs inside the server, in the family's
    engine core, where the steps of concurrent requests are batched together."""

    kind = "served"

    def __init__(self, name: str, ctx: BenchContext, url: str):
        from ti2i.client.remote import RemoteMethodClient

        super().__init__(name, ctx)
        self.url, self.model = url, ctx.method
        self.client = RemoteMethodClient(url)  # one connection for all of this backend's requests

    def run(self, image: Image.Image, seed: int) -> RunRecord:
        self.ctx.status(f"{self.name} · {self.ctx.method} request")
        start = time.perf_counter()
        result = self.client.run(METHODS[self.ctx.method], progress=False, stream=False, model=self.model,
                                 **method_kwargs(self.ctx.method, image, self.ctx.request, seed))
        elapsed = time.perf_counter() - start
        return RunRecord(elapsed, {k: list(v) for k, v in result.timings.samples.items()}, result.array)

    def new_client(self) -> MethodBackend:
        """A client of its own (a connection per sweep client thread)."""
        return MethodBackend(self.name, self.ctx, self.url)

    def close(self) -> None:
        self.client.close()

    def __call__(self, image: Image.Image, seed: int) -> None:
        self.run(image, seed)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model": self.model}


class BatchedBackend(Backend):
    """Our loops in-process over one `StepScheduler`: the engine core's batching of concurrent requests' steps,
    in this process, without a server. Its sweep clients share one scheduler per level, made with the level's
    first client and closed with its last; `step_counts` says what the batching merged."""

    kind = "in-process"

    def __init__(self, name: str, ctx: BenchContext, providers: list[str]):
        super().__init__(name, ctx)
        self.providers = providers
        self._shared: Any = None
        self._clients = 0
        self.runner = self._scheduler()

    def _scheduler(self) -> Any:
        from ti2i.client.runners import InProcessRunner
        from ti2i.engines.step_scheduler import StepScheduler

        engines = InProcessRunner(self.ctx.engine_dir, providers=self.providers)
        load_engines(engines, self.ctx.method)  # before the clock starts
        return StepScheduler(engines)

    def run(self, image: Image.Image, seed: int) -> RunRecord:
        start = time.perf_counter()
        with self.runner.request(self.ctx.method):
            timings, array = run_method(self.ctx.method, self.runner, image, self.ctx.request, seed)
        return RunRecord(time.perf_counter() - start, {k: list(v) for k, v in timings.samples.items()}, array)

    def new_client(self) -> _BatchedClient:
        if self._shared is None:
            self._shared = self._scheduler()
        self._clients += 1
        return _BatchedClient(self)

    def step_counts(self) -> dict[tuple[str, tuple[tuple[str, int], ...], int, int], int]:
        """(component, samples by method, requests' calls merged, samples) -> engine calls, so far at this level."""
        return dict(self._shared.executions) if self._shared is not None else {}

    def _release(self) -> None:
        self._clients -= 1
        if self._clients == 0 and self._shared is not None:
            self._shared.engines.close()
            self._shared = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "providers": self.providers, "scheduler": "StepScheduler"}

    def close(self) -> None:
        self.runner.engines.close()


class _BatchedClient:
    def __init__(self, backend: BatchedBackend):
        self.backend, self.scheduler = backend, backend._shared

    def __call__(self, image: Image.Image, seed: int) -> None:
        with self.scheduler.request(self.backend.ctx.method):
            run_method(self.backend.ctx.method, self.scheduler, image, self.backend.ctx.request, seed)

    def close(self) -> None:
        self.backend._release()


def _method(protocol: str) -> Callable[[str, BenchContext], Backend]:
    def factory(name: str, ctx: BenchContext) -> Backend:
        if ctx.server is None:
            raise RuntimeError("no Triton server is running")
        model = ctx.method
        if not (ctx.server.model_repository / model).is_dir():
            raise RuntimeError(f"the server has no {model} method model")
        url = f"grpc://{ctx.server.grpc_url}" if protocol == "grpc" else f"http://{ctx.server.http_url}"
        return MethodBackend(name, ctx, url)

    return factory


def _ort(name: str, ctx: BenchContext) -> Backend:
    from ti2i.client.runners import InProcessRunner
    from ti2i.engines.ort import default_providers

    providers = list(ctx.providers or default_providers())
    return RunnerBackend(name, ctx, lambda: InProcessRunner(ctx.engine_dir, providers=providers), "in-process",
                         {"providers": providers})


def _openvino(name: str, ctx: BenchContext) -> Backend:
    from ti2i.client.runners import InProcessRunner
    from ti2i.engines.loader import describe_choice, engine_choice

    choice = engine_choice("openvino")  # precision auto: bf16 where the CPU has the units
    return RunnerBackend(name, ctx, lambda: InProcessRunner(ctx.engine_dir, **choice), "in-process",
                         {"precision": choice["precision"], "engines": describe_choice(choice)})


def _ort_batched(name: str, ctx: BenchContext) -> Backend:
    from ti2i.engines.ort import default_providers

    return BatchedBackend(name, ctx, list(ctx.providers or default_providers()))


def _triton(protocol: str, shared_memory: bool = False) -> Callable[[str, BenchContext], Backend]:
    def factory(name: str, ctx: BenchContext) -> Backend:
        from ti2i.client.runners import TritonRunner

        if ctx.server is None:
            raise RuntimeError("no Triton server is running")
        url = f"grpc://{ctx.server.grpc_url}" if protocol == "grpc" else f"http://{ctx.server.http_url}"
        key = getattr(ctx.server, "api_key", None)  # the shared-memory API is restricted to the server's key
        return RunnerBackend(name, ctx, lambda: TritonRunner(url, shared_memory=shared_memory, api_key=key), "served",
                             {"url": url, "shared_memory": shared_memory})

    return factory


# --- the diffusers reference pipelines ---------------------------------------------------------------

class _Clock:
    """Wall-clock seconds; synchronised with the GPU on CUDA so a stage's kernels are inside its time."""

    def __init__(self, device: str):
        import torch

        self._sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def now(self) -> float:
        self._sync()
        return time.perf_counter()


class _StageTimers:
    """Wraps a pipeline's callables so every call adds its time to the current request's stage list."""

    def __init__(self, clock: _Clock, status: Callable[[str], None]):
        self.clock = clock
        self.status = status
        self.label = ""
        self.samples: dict[str, list[float]] | None = None

    def wrap(self, fn: Callable[..., Any], stage: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.samples is None:
                return fn(*args, **kwargs)
            calls = self.samples.setdefault(stage, [])
            self.status(f"{self.label} · {stage} #{len(calls) + 1}")
            start = self.clock.now()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append(self.clock.now() - start)

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed


class _Reference:
    """One diffusers pipeline per method, shared by the eager and the compiled backend (one copy of the weights).

    The timers wrap the pipeline's stage entry points (prompt encoding, ``vae.encode``, ``unet``,
    ``vae.decode``) once; underneath, the UNet's and the VAE encoder's and decoder's ``forward`` go
    through a switch that each backend sets before its request: the eager originals or their
    torch.compile'd versions. So both backends are timed by the same code around the same calls.
    """

    def __init__(self, ctx: BenchContext):
        import diffusers
        import torch

        from ti2i.client.steps import is_sdxl
        from ti2i.manifest import Manifest

        ref = METHODS[ctx.method].reference
        if ref is None:
            raise RuntimeError(f"{ctx.method} has no diffusers reference pipeline")
        prompt_fn, clip_fn = ref.prompt_fn, ref.clip_fn
        kwargs: dict[str, Any] = {"torch_dtype": torch.float32}
        if is_sdxl(Manifest.load(ctx.engine_dir).pipeline):
            cls, prompt_fn = getattr(diffusers, ref.sdxl_pipeline), "encode_prompt"
        else:
            cls = getattr(diffusers, ref.pipeline)
            if ref.prompt_fn is not None:  # the text-conditioned SD pipelines carry a safety checker slot
                kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = cls.from_pretrained(str(ctx.model_dir), **kwargs)
        if ref.scheduler is not None:
            pipe.scheduler = getattr(diffusers, ref.scheduler).from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(ctx.device)
        self.pipe = pipe
        self.ctx = ctx
        self.timers = timers = _StageTimers(_Clock(ctx.device), ctx.status)
        if prompt_fn:
            setattr(pipe, prompt_fn, timers.wrap(getattr(pipe, prompt_fn), "encode_prompt"))
        if clip_fn:
            setattr(pipe, clip_fn, timers.wrap(getattr(pipe, clip_fn), "encode_image_clip"))
        pipe.vae.encode = timers.wrap(pipe.vae.encode, "encode_image")
        pipe.vae.decode = timers.wrap(pipe.vae.decode, "decode_chunk" if ctx.method == "svd" else "decode_image")
        modules = {"unet": pipe.unet, "vae_encoder": pipe.vae.encoder, "vae_decoder": pipe.vae.decoder}
        self.eager = {key: module.forward for key, module in modules.items()}  # the modules' own forwards
        self.current = dict(self.eager)
        for key, module in modules.items():
            module.forward = self._switch(key)
        pipe.unet.forward = timers.wrap(pipe.unet.forward, "unet")

    def _switch(self, key: str) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.current[key](*args, **kwargs)

        return forward

    def install(self, callables: Mapping[str, Callable[..., Any]]) -> None:
        self.current = dict(callables)

    def __call__(self, image: Image.Image, seed: int, label: str) -> RunRecord:
        import torch

        method, pipe = self.ctx.method, self.pipe
        ref = METHODS[method].reference
        ours = method_kwargs(method, image, self.ctx.request, seed)
        call = {name: ours[name] for name in ("prompt", "negative_prompt", "image") if name in ours}
        if "mask" in ours:
            call["mask_image"] = ours["mask"]
        call.update({key: ours[name] for key, name in ref.kwargs.items() if ours.get(name) is not None})
        generator = torch.Generator("cpu").manual_seed(seed)
        samples: dict[str, list[float]] = {}
        self.timers.samples, self.timers.label = samples, label
        try:
            start = self.timers.clock.now()
            with torch.inference_mode():
                out = getattr(pipe(**call, generator=generator, output_type="np"), ref.output)[0]
            elapsed = self.timers.clock.now() - start
        finally:
            self.timers.samples = None
        return RunRecord(elapsed, samples, np.asarray(out, dtype=np.float32))


def _reference(ctx: BenchContext, dtype: str = "float32") -> _Reference:
    """The method's pipeline in `dtype` (its weights cast from fp32), one per benchmark context."""
    key = f"reference-{dtype}"
    if key not in ctx.shared:
        reference = _Reference(ctx)
        if dtype != "float32":
            import torch

            reference.pipe.to(getattr(torch, dtype))
        ctx.shared[key] = reference
    return ctx.shared[key]


class DiffusersBackend(Backend):
    """The diffusers pipeline on torch eager, or with its UNet and VAE under torch.compile; in fp32, or with its
    weights cast to `dtype` (one copy per dtype, shared like the fp32 one)."""

    kind = "reference"

    def __init__(self, name: str, ctx: BenchContext, compile: bool = False, dtype: str = "float32"):
        super().__init__(name, ctx)
        self.reference = _reference(ctx, dtype)
        self.compile = compile
        self.dtype = dtype
        eager = self.reference.eager
        if compile:
            import torch

            # The timers stay outside the compiled regions: only the modules' forwards are compiled.
            self.callables = {k: torch.compile(fn) for k, fn in eager.items()}
        else:
            self.callables = dict(eager)

    def run(self, image: Image.Image, seed: int) -> RunRecord:
        self.reference.install(self.callables)
        return self.reference(image, seed, self.name)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"kind": self.kind, "device": self.ctx.device, "torch_threads": torch.get_num_threads(),
                "compiled": self.compile, "dtype": self.dtype}


register_backend("diffusers", lambda name, ctx: DiffusersBackend(name, ctx),
                 description="the diffusers reference pipeline on torch eager",
                 holds_model=True)
register_backend("diffusers-compile", lambda name, ctx: DiffusersBackend(name, ctx, compile=True),
                 description="the diffusers pipeline, UNet and VAE under torch.compile (inductor)",
                 holds_model=True)
register_backend("diffusers-bf16", lambda name, ctx: DiffusersBackend(name, ctx, dtype="bfloat16"),
                 description="the diffusers pipeline, its weights in bfloat16 (torch_dtype=torch.bfloat16)",
                 holds_model=True)
register_backend("ort", _ort, description="our method loop over our ONNX Runtime engines, in-process")
register_backend("openvino", _openvino,
                 description="our method loop over the same ONNX graphs compiled by OpenVINO for this CPU (bf16 "
                             "where it has AMX or AVX-512-BF16), in-process")
register_backend("ort-batched", _ort_batched,
                 description="our method loops in-process over one step scheduler (the engine core's "
                             "batching of concurrent requests, without a server)")
register_backend("triton-grpc", _triton("grpc"), needs_server=True,
                 description="our method loop, every model call to Triton over gRPC")
register_backend("triton-http", _triton("http"), needs_server=True,
                 description="our method loop, every model call to Triton over HTTP")
register_backend("triton-method", _method("grpc"), needs_server=True, method_model=True,
                 description="one gRPC request per edit to the served method model (the loop in the family's "
                             "engine core, concurrent requests' steps batched together)")
register_backend("triton-method-http", _method("http"), needs_server=True, method_model=True,
                 description="as triton-method, over HTTP")
register_backend("triton-grpc-shm", _triton("grpc", shared_memory=True), needs_server=True,
                 description="as triton-grpc, tensors through Triton system shared memory")

DEFAULT_BACKENDS = ("diffusers", "diffusers-compile", "ort", "triton-grpc", "triton-http", "triton-grpc-shm",
                    "triton-method")

# registers ort-fp16, aoti, tensorrt, triton-tensorrt and diffusers-fp16
from ti2i.benchmarks import gpu_backends  # noqa: E402,F401
