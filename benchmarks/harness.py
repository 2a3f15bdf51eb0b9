"""The benchmark harness: every backend measured in one process run, interleaved, per method.

For each method: build (or reuse from the cache) the preset's model folder and engines, start the
bundled Triton server when a served backend or the concurrency sweep needs it, then

1. set up each backend and warm it up (warm-up requests are recorded but not summarised; a backend
   that fails here, e.g. torch.compile without a working compiler, is skipped with its reason);
2. run `repeats` rounds; each round runs one request on every backend, the order rotated every
   round, so machine drift and cache effects hit all backends alike;
3. time single UNet calls with identical inputs on every runner backend, interleaved: the serving
   overhead of one call is the served time minus the in-process time;
4. sweep the concurrency levels against the server (`sweep.py`): N client threads, each with its own
   runner, issue whole requests at once; throughput, latency percentiles, and from Triton's statistics
   API each model's queue and compute time, and from the engine core's metrics how many requests' UNet
   calls each engine call merged, the levels interleaved over `--concurrency-rounds` rounds.

Results are written after every measured request (JSON, then the markdown table; the plot at the
end), so an interrupted run leaves what it measured so far.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ti2i.benchmarks import machine, report
from ti2i.benchmarks.backends import BACKENDS, UNET_OF, Backend, BenchContext, RunnerBackend
from ti2i.benchmarks.presets import METHOD_KINDS, Preset, default_cache_dir, engine_dir, get_preset, model_dir, \
    model_preset
from ti2i.benchmarks.stats import median, ratio, summarize
from ti2i.benchmarks.sweep import first_line, run_sweep
from ti2i.client.registry import STREAM_SUFFIX
from ti2i.errors import InvalidInputError

SCHEMA = "ti2i-bench/1"
EXAMPLE = machine.PROJECT_ROOT / "examples" / "input.png"
REFERENCE = "diffusers"
RESIDENT_SHARE = 0.8  # of MemAvailable the measured backends' weights may take together
IN_PROCESS = "ort"
SEED = 0


@dataclass
class BenchConfig:
    methods: Sequence[str]
    preset: str = "tiny"
    backends: Sequence[str] = ()
    concurrency: Sequence[int] = (1, 2, 4, 8)
    out: Path = Path("bench-results")
    model: str | None = None  # a real diffusers folder instead of the preset's models
    cache: Path | None = None
    repeats: int | None = None  # default: the preset's
    warmup: int | None = None
    steps: int | None = None  # overrides the preset's request
    unet_calls: int | None = None  # single-UNet-call samples per backend (default: preset-sized)
    concurrency_backend: str = "triton-grpc"
    concurrency_requests: int | None = None  # whole requests per client at each level
    concurrency_rounds: int = 1  # every level once per round, back to back (benchmarks/sweep.py)
    image: Path = EXAMPLE
    max_queue_delay_us: int | None = None  # the served models' dynamic-batching delay (default: the repository's)
    max_queue_size: int | None = None  # the component models' queue bound (0: no queue policy; default: the repository's)
    engine_backend: str = "ort"  # the served backends' engines (the core's `--backend`; precision auto)
    quiet: bool = False
    argv: Sequence[str] = field(default_factory=list)


class Progress:
    """One status line (backend, stage) rewritten on a terminal; throttled plain lines elsewhere."""

    def __init__(self, quiet: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.phase = ""
        self.start = time.monotonic()
        self._last = 0.0
        self._width = 0

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60:02d}:{s % 60:02d}"

    def log(self, text: str) -> None:
        if self.quiet:
            return
        self._clear()
        print(f"[{self._elapsed()}] {text}", file=self.stream, flush=True)

    def status(self, text: str) -> None:
        if self.quiet:
            return
        line = f"[{self._elapsed()}] {self.phase} · {text}" if self.phase else f"[{self._elapsed()}] {text}"
        if self.tty:
            line = line[:160]
            print("\r" + line.ljust(self._width), end="", file=self.stream, flush=True)
            self._width = len(line)
        elif time.monotonic() - self._last >= 15.0:  # logs: a heartbeat, not a flood
            self._last = time.monotonic()
            print(line, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self.tty and self._width:
            print("\r" + " " * self._width + "\r", end="", file=self.stream, flush=True)
            self._width = 0


class Results:
    """The results document, written atomically after every change that matters."""

    def __init__(self, out: Path, data: dict[str, Any]):
        self.out = out
        self.data = data
        out.mkdir(parents=True, exist_ok=True)
        self.json_path = out / "results.json"
        self.md_path = out / "results.md"
        self.png_path = out / "results.png"

    def save(self, plot: bool = False) -> None:
        self.data["updated"] = _now()
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
        os.replace(tmp, self.json_path)
        self.md_path.write_text(report.markdown(self.data))
        if plot:
            try:
                if report.plot(self.data, self.png_path):
                    self.data["plot"] = self.png_path.name
            except Exception as err:  # a plotting problem must not lose the measurements
                self.data["plot_error"] = f"{type(err).__name__}: {err}"
            tmp.write_text(json.dumps(self.data, indent=1, default=_json_default) + "\n")
            os.replace(tmp, self.json_path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def resolve_methods(spec: str | Sequence[str], preset: Preset) -> list[str]:
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else list(spec)
    if names == ["all"]:
        return [m for m in METHOD_KINDS if m in preset.requests]
    unknown = [m for m in names if m not in METHOD_KINDS]
    if unknown:
        raise InvalidInputError(f"unknown method(s) {unknown} (known: {', '.join(METHOD_KINDS)}, all)")
    missing = [m for m in names if m not in preset.requests]
    if missing:
        raise InvalidInputError(f"preset {preset.name!r} has no request for {missing} "
                                f"(it has {', '.join(preset.requests)})")
    return names


def resolve_backends(names: Sequence[str]) -> list[str]:
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise InvalidInputError(f"unknown backend(s) {unknown} (known: {', '.join(BACKENDS)})")
    return list(dict.fromkeys(names))


def run_benchmark(config: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; return the results document (also written under `config.out`)."""
    preset = model_preset(config.model, config.preset) if config.model else get_preset(config.preset)
    methods = resolve_methods(config.methods, preset)
    backends = resolve_backends(config.backends or list(BACKENDS))
    levels = sorted({int(n) for n in config.concurrency if int(n) > 0})
    unknown = [b for b in concurrency_backends(config) if b not in BACKENDS]
    if config.concurrency and levels and unknown:
        raise InvalidInputError(f"unknown concurrency backend {', '.join(unknown)}")
    cache = Path(config.cache or default_cache_dir()).expanduser()
    progress = Progress(config.quiet)
    _quiet_libraries()
    repeats = config.repeats or preset.repeats
    warmup = preset.warmup if config.warmup is None else config.warmup
    results = Results(Path(config.out), {
        "schema": SCHEMA,
        "started": _now(),
        "complete": False,
        "command": list(config.argv),
        "machine": machine.describe_machine(),
        "versions": machine.versions(),
        "git": machine.git_state(),
        "config": {
            "preset": preset.name, "preset_description": preset.description, "methods": methods,
            "backends": backends, "concurrency": levels, "concurrency_backend": config.concurrency_backend,
            "engine_backend": config.engine_backend,
            "repeats": repeats, "warmup": warmup, "cache": str(cache), "model": config.model,
            "image": str(config.image), "seed": SEED,
        },
        "methods": {},
    })
    results.save()
    progress.log(f"benchmark: preset {preset.name}, methods {', '.join(methods)}, backends {', '.join(backends)}, "
                 f"concurrency {levels or 'none'}; results in {results.out}")
    try:
        for method in methods:
            entry = results.data["methods"].setdefault(method, {"status": "running"})
            try:
                _bench_method(method, preset, config, backends, levels, repeats, warmup, cache, entry, results,
                              progress)
                entry["status"] = "done"
            except KeyboardInterrupt:
                entry["status"] = "interrupted"
                raise
            except Exception as err:
                entry["status"] = "error"
                entry["error"] = f"{type(err).__name__}: {err}"
                progress.log(f"[{method}] failed: {entry['error']}")
            finally:
                gc.collect()
                results.save()
        results.data["complete"] = True
    except KeyboardInterrupt:
        results.data["interrupted"] = True
        progress.log("interrupted: writing the partial results")
        raise
    finally:
        results.data["finished"] = _now()
        results.data["machine"]["load_average_at_end"] = machine.load_average()
        results.save(plot=True)
        progress.log(f"wrote {results.json_path}, {results.md_path}" +
                     (f", {results.png_path}" if "plot" in results.data else ""))
    return results.data


def _quiet_libraries() -> None:
    """Loading chatter and deprecation notices would bury the progress lines."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TorchScript-based ONNX export")
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for module in (diffusers_logging, transformers_logging):
            module.set_verbosity_error()
            module.disable_progress_bar()
    except ImportError:
        pass


def _bench_method(method: str, preset: Preset, config: BenchConfig, backends: list[str], levels: list[int],
                  repeats: int, warmup: int, cache: Path, entry: dict[str, Any], results: Results,
                  progress: Progress) -> None:
    import torch

    kind = METHOD_KINDS[method]
    request = preset.request(method, config.steps)
    if method in ("sdedit", "cyclediffusion") and int(request.steps * request.strength) < 1:
        raise InvalidInputError(f"{method}: {request.steps} steps at strength {request.strength} run no denoising "
                                f"step (steps × strength must be ≥ 1)")
    progress.phase = method
    models = model_dir(preset, kind, cache, progress.log)
    engines = engine_dir(preset, ["svd"] if kind == "svd" else [kind], cache, progress.log)
    entry.update(request=request.to_json(), model_dir=str(models), engine_dir=str(engines), backends={},
                 rounds=[])
    image = Image.open(config.image).convert("RGB").resize((request.width, request.height), Image.LANCZOS)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    need_server = bool(levels) or any(BACKENDS[b].needs_server for b in backends)
    ctx = BenchContext(method, request, engines, models, device=device, status=progress.status)
    options = _repository_options(config)
    served = {*backends, *(concurrency_backends(config) if levels else [])}
    method_model = any(BACKENDS[b].method_model for b in served)
    outputs: dict[str, np.ndarray] = {}
    unet_calls = config.unet_calls or (30 if preset.name == "tiny" else 3)

    def measure(group: list[str]) -> None:
        live = _setup_backends(group, ctx, entry, progress)
        try:
            _warm_up(method, live, warmup, image, entry, progress)
            _measure(method, live, repeats, image, entry, results, progress, outputs)
            _unet_calls(live, method, unet_calls, entry, progress)
        finally:
            for backend in live.values():
                with contextlib.suppress(Exception):
                    backend.close()
            ctx.shared.clear()
            gc.collect()

    groups = _resident_groups(backends, ctx, need_server, entry, progress)
    apart = len(groups) > 1  # then the server (another copy of the engines) is up only for what needs it
    try:
        for group in groups:
            if apart and not BACKENDS[group[0]].needs_server:
                measure(group)
        with _server(engines, method, results.out, need_server, options, progress, max(levels or [1]),
                     method_model, config.engine_backend) as server:
            if server is not None:
                ctx.server = server
                entry["server"] = _server_info(server, options)
            for group in groups:
                if not apart or BACKENDS[group[0]].needs_server:
                    measure(group)
            _agreement(entry, outputs)
            _summarize(entry)
            results.save()
            if levels and server is not None:
                for name in concurrency_backends(config):  # one sweep after the other, on the same server
                    run_sweep(method, name, levels, config.concurrency_requests or preset.concurrency_requests,
                              config.concurrency_rounds, ctx, image, SEED, entry, results.save, progress)
    finally:
        if "summary" not in entry:  # interrupted or failed while measuring: summarise what was measured
            with contextlib.suppress(Exception):
                _summarize(entry)
    progress.phase = ""


def _resident_groups(backends: list[str], ctx: BenchContext, served: bool, entry: dict[str, Any],
                     progress: Progress) -> list[list[str]]:
    """The backends alternate round by round (drift on a shared machine cancels in the paired ratios) when their
    weights, and the server's, fit in memory together; otherwise each is measured on its own, one after the
    other: SDXL at its real size held by diffusers and by our engines at once does not fit a 24 GiB host."""
    from ti2i.budget import available_memory, format_bytes

    engines = _engine_bytes(ctx)
    held = {name: 0 if BACKENDS[name].needs_server else
            _folder_weight_bytes(ctx.model_dir) if BACKENDS[name].holds_model else engines for name in backends}
    need = sum(held.values()) + (engines if served else 0)  # the server's instances load the engines too
    available = available_memory()
    if len(backends) < 2 or need <= RESIDENT_SHARE * available:
        return [backends]
    entry["one_at_a_time"] = {"weights_bytes": held, "server_bytes": engines if served else 0,
                              "available_bytes": available}
    progress.log(f"[{ctx.method}] backends one at a time: together they hold {format_bytes(need)} of weights, "
                 f"{format_bytes(available)} is available")
    return [[name] for name in backends]


def _engine_bytes(ctx: BenchContext) -> int:
    """What the method's engines hold loaded (measured when they were exported)."""
    from ti2i.client.methods import components_for
    from ti2i.manifest import Manifest

    manifest = Manifest.load(ctx.engine_dir)
    entries = [manifest.components[name] for name in components_for([ctx.method], manifest.components)]
    return sum(entry.memory.base for entry in entries if entry.memory is not None)


def _folder_weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.suffix in (".safetensors", ".bin"))


def _repository_options(config: BenchConfig) -> Any:
    from ti2i.triton_models.repository import RepositoryOptions

    given = {"max_queue_delay_us": config.max_queue_delay_us, "max_queue_size": config.max_queue_size}
    return RepositoryOptions(**{k: v for k, v in given.items() if v is not None})


@contextlib.contextmanager
def _server(engines: Path, method: str, out: Path, needed: bool, options: Any, progress: Progress,
            method_active: int = 1, method_model: bool = False, engine_backend: str = "ort") -> Iterator[Any]:
    """The server of one method's components, through the family's engine core (`ti2i.triton_models.core`)
    with as many active requests as the sweep's largest level; with `method_model`, its method model too."""
    if not needed:
        yield None
        return
    from ti2i.client.methods import components_for
    from ti2i.manifest import Manifest
    from ti2i.triton_models.core import CoreOptions
    from ti2i.triton_models.repository import write_repository
    from ti2i.triton_models.server import TritonServer

    manifest = Manifest.load(engines)
    with tempfile.TemporaryDirectory(prefix="ti2i-bench-") as tmp:
        core = CoreOptions(active=method_active, max_queue=max(method_active, options.max_queue_size),
                           queue_timeout_s=options.queue_timeout_us / 1e6, backend=engine_backend)
        repo = write_repository(manifest, Path(tmp) / "repository", options,
                                models=components_for([method], manifest.components),
                                methods=[method] if method_model else [], core_options=core)
        if method_model:  # the bench sends plain requests only
            shutil.rmtree(repo / (method + STREAM_SUFFIX))
        progress.log(f"[{method}] starting tritonserver ({len(list(repo.iterdir()))} models)")
        start = time.perf_counter()
        with TritonServer(repo, log_path=out / f"server-{method}.log", startup_timeout_s=900) as server:
            server.startup_s = time.perf_counter() - start  # type: ignore[attr-defined]
            progress.log(f"[{method}] server ready in {server.startup_s:.1f} s (gRPC {server.grpc_url})")
            yield server


def _server_info(server: Any, options: Any) -> dict[str, Any]:
    info: dict[str, Any] = {"startup_s": getattr(server, "startup_s", None), "log": str(server.log_path),
                            "repository_options": dict(options.__dict__)}
    try:
        import tritonclient.grpc as grpcclient

        with contextlib.closing(grpcclient.InferenceServerClient(server.grpc_url)) as client:
            meta = client.get_server_metadata(as_json=True)
        info.update(version=meta.get("version"), extensions=meta.get("extensions"))
    except Exception as err:
        info["metadata_error"] = str(err)
    return info


def _setup_backends(names: list[str], ctx: BenchContext, entry: dict[str, Any],
                    progress: Progress) -> dict[str, Backend]:
    live: dict[str, Backend] = {}
    for name in names:
        info = BACKENDS[name]
        record = entry["backends"].setdefault(name, {"description": info.description})
        progress.status(f"{name} · setting up")
        start = time.perf_counter()
        try:
            backend = info.factory(name, ctx)
        except KeyboardInterrupt:
            raise
        except Exception as err:
            record.update(status="skipped", reason=f"setup failed: {type(err).__name__}: {first_line(err)}")
            progress.log(f"[{ctx.method}] {name}: skipped ({record['reason']})")
            continue
        record.update(status="ok", setup_s=time.perf_counter() - start, details=backend.describe(),
                      warmup_s=[], repeats=[])
        live[name] = backend
    return live


def _warm_up(method: str, live: dict[str, Backend], warmup: int, image: Image.Image, entry: dict[str, Any],
             progress: Progress) -> None:
    """Warm-up requests (at least one: first calls load engines, compile graphs, open connections).

    A backend that fails here is skipped with the reason recorded.
    """
    for i in range(max(1, warmup)):
        progress.phase = f"{method} · warm-up {i + 1}"
        for name in list(live):
            record = entry["backends"][name]
            try:
                run = live[name].run(image, SEED)
            except KeyboardInterrupt:
                raise
            except Exception as err:
                record.update(status="skipped", reason=f"warm-up failed: {type(err).__name__}: {first_line(err)}")
                progress.log(f"[{method}] {name}: skipped ({record['reason']})")
                with contextlib.suppress(Exception):
                    live.pop(name).close()
                continue
            record["warmup_s"].append(run.end_to_end_s)
            progress.log(f"[{method}] warm-up {name}: {run.end_to_end_s:.3f} s")


def _measure(method: str, live: dict[str, Backend], repeats: int, image: Image.Image, entry: dict[str, Any],
             results: Results, progress: Progress, outputs: dict[str, np.ndarray]) -> None:
    """`repeats` rounds of every live backend; each one's first output joins `outputs`."""
    names = list(live)
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)] if names else []
        entry["rounds"].append({"order": [n for n in order if n in live], "load_average": machine.load_average()})
        for name in order:
            if name not in live:
                continue
            record = entry["backends"][name]
            progress.phase = f"{method} · repeat {r + 1}/{repeats}"
            try:
                run = live[name].run(image, SEED)
            except KeyboardInterrupt:
                raise
            except Exception as err:
                record.update(status="error", reason=f"repeat {r + 1} failed: {type(err).__name__}: "
                                                     f"{first_line(err)}")
                progress.log(f"[{method}] {name}: dropped ({record['reason']})")
                with contextlib.suppress(Exception):
                    live.pop(name).close()
                continue
            record["repeats"].append({"end_to_end_s": run.end_to_end_s, "stages": run.stages})
            if run.output is not None:
                outputs.setdefault(name, run.output)
            progress.log(f"[{method}] repeat {r + 1}/{repeats} {name}: {run.end_to_end_s:.3f} s")
            results.save()


def _agreement(entry: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
    """Agreement with the reference (same seed, same request): evidence that all backends did the same work."""
    reference = outputs.get(REFERENCE)
    for name, output in outputs.items():
        if reference is not None and name != REFERENCE and output.shape == reference.shape:
            diff = np.abs(output.astype(np.float64) - reference.astype(np.float64)).max()
            entry["backends"][name]["max_abs_vs_diffusers"] = float(diff)


def _summarize(entry: dict[str, Any]) -> None:
    summary: dict[str, Any] = {}
    for name, record in entry["backends"].items():
        runs = record.get("repeats") or []
        if not runs:
            continue
        stages: dict[str, Any] = {}
        for stage in dict.fromkeys(s for run in runs for s in run["stages"]):
            calls = [run["stages"].get(stage, []) for run in runs]
            stages[stage] = {
                "calls_per_request": median([len(c) for c in calls]),
                "per_request_s": summarize([sum(c) for c in calls if c]),
                "per_call_s": summarize([x for c in calls for x in c]),
            }
        e2e = [run["end_to_end_s"] for run in runs]
        staged = [sum(sum(c) for c in run["stages"].values()) for run in runs]
        summary[name] = {"end_to_end_s": summarize(e2e),
                         "outside_stages_s": summarize([t - s for t, s in zip(e2e, staged)]),
                         "stages": stages}
    entry["summary"] = summary
    entry["ratios"] = _ratios(entry)
    for name, figures in _serving_overhead(entry).items():  # beside the single UNet calls' figures
        entry.setdefault("serving_overhead_ms", {}).setdefault(name, {}).update(figures)


def _e2e(entry: dict[str, Any], name: str) -> float | None:
    return (entry.get("summary", {}).get(name, {}).get("end_to_end_s") or {}).get("median")


def _paired(entry: dict[str, Any], a: str, b: str) -> list[float]:
    """Per-round ratios a/b of end-to-end times (rounds run back to back, so drift cancels)."""
    ra = entry["backends"].get(a, {}).get("repeats") or []
    rb = entry["backends"].get(b, {}).get("repeats") or []
    return [x["end_to_end_s"] / y["end_to_end_s"] for x, y in zip(ra, rb) if y["end_to_end_s"] > 0]


def _ratios(entry: dict[str, Any]) -> dict[str, Any]:
    """Speed-up over the reference and time relative to in-process, per backend.

    The headline figure is the median over rounds of the per-round ratio: each round runs every
    backend back to back, so load that comes and goes on a shared machine mostly cancels. The
    ratio of the two medians is kept beside it.
    """
    out: dict[str, Any] = {}
    for name in entry.get("summary", {}):
        item: dict[str, Any] = {}
        if name != REFERENCE and _e2e(entry, REFERENCE):
            item["speedup_vs_diffusers"] = median(_paired(entry, REFERENCE, name))
            item["speedup_vs_diffusers_of_medians"] = ratio(_e2e(entry, REFERENCE), _e2e(entry, name))
        if name != IN_PROCESS and _e2e(entry, IN_PROCESS):
            item["time_vs_ort"] = median(_paired(entry, name, IN_PROCESS))
            item["time_vs_ort_of_medians"] = ratio(_e2e(entry, name), _e2e(entry, IN_PROCESS))
        if item:
            out[name] = item
    return out


def _serving_overhead(entry: dict[str, Any]) -> dict[str, Any]:
    """Per UNet call: served time minus in-process time of the same step of the same round (ms)."""
    base = entry["backends"].get(IN_PROCESS, {}).get("repeats") or []
    out: dict[str, Any] = {}
    for name, record in entry["backends"].items():
        if (record.get("details") or {}).get("kind") != "served" or not base:
            continue
        diffs = []
        for served, local in zip(record.get("repeats") or [], base):
            for a, b in zip(served["stages"].get("unet", []), local["stages"].get("unet", [])):
                diffs.append((a - b) * 1e3)
        if diffs:
            out[name] = {"from_requests": summarize(diffs)}
    return out


def _unet_calls(live: dict[str, Backend], method: str, count: int, entry: dict[str, Any],
                progress: Progress) -> None:
    """Single UNet calls with identical inputs (those of the method's first step), interleaved across backends."""
    runners = {n: b for n, b in live.items() if isinstance(b, RunnerBackend)}
    if IN_PROCESS not in runners or len(runners) < 2 or count <= 0:
        return
    inputs = _unet_inputs(runners[IN_PROCESS], method)
    if inputs is None:
        return
    samples: dict[str, list[float]] = {n: [] for n in runners}
    names = list(runners)
    progress.phase = f"{method} · unet calls"
    for i in range(count + 1):  # the first round is a warm-up
        for name in names[i % len(names):] + names[:i % len(names)]:
            progress.status(f"{name} · {UNET_OF[method]} call {i}/{count}")
            elapsed = runners[name].unet_call(inputs)
            if i:
                samples[name].append(elapsed)
    entry["unet_calls"] = {
        "model": UNET_OF[method],
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "samples_s": samples,
        "summary_s": {n: summarize(v) for n, v in samples.items()},
    }
    local = samples[IN_PROCESS]
    for name, values in samples.items():
        if name != IN_PROCESS and (entry["backends"][name].get("details") or {}).get("kind") == "served":
            diffs = [(a - b) * 1e3 for a, b in zip(values, local)]
            entry.setdefault("serving_overhead_ms", {}).setdefault(name, {})["from_unet_calls"] = summarize(diffs)
    progress.log(f"[{method}] single {UNET_OF[method]} calls, median ms: " +
                 ", ".join(f"{n} {median(v) * 1e3:.2f}" for n, v in samples.items()))


def _unet_inputs(backend: RunnerBackend, method: str) -> dict[str, np.ndarray] | None:
    """The inputs of the UNet's first call in a request, as the in-process runner saw them."""
    return backend.runner.first_inputs.get(UNET_OF[method])


def concurrency_backends(config: BenchConfig) -> list[str]:
    """The backends the concurrency sweep runs, in order (`--concurrency-backend a,b`)."""
    return [b.strip() for b in config.concurrency_backend.split(",") if b.strip()]
