"""What per-request LoRA adapters cost (`ti2i bench --adapters`), measured side by side in one run.

- Throughput: `clients` concurrent SDEdit requests on one engine core (in-process: the core is what batches
  them), each client with its own adapter, beside every client with the same adapter and beside none. The
  goal: different adapters keep ≥ 0.8× the throughput of one shared adapter.
- One UNet call (the CFG pair at the preset's size): with an adapter (rank `rank`) beside without, and beside
  the same UNet exported without adapter inputs at all (what the inputs cost a call that uses none).

Modes alternate round by round; each figure is the median of its rounds. Results: adapters.json and adapters.md.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from ti2i.benchmarks.clients import run_clients
from ti2i.benchmarks.machine import describe_machine, label
from ti2i.benchmarks.presets import default_cache_dir, engine_dir, get_preset, model_dir
from ti2i.benchmarks.stats import interleaved_medians
from ti2i.client.registry import METHODS
from ti2i.engines.adapters import LORA_RANK, RANK_AXES
from ti2i.errors import InvalidInputError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"
SDEDIT = ("tokenize", "text_encoder", "image_preprocess", "vae_encoder", "unet", "vae_decoder", "image_postprocess")
MODES = ("none", "same", "different")


def run_adapter_bench(out: Path, preset: str = "tiny", clients: int = 8, requests: int = 2, rounds: int = 3,
                      rank: int = 8, unet_calls: int = 20, cache: Path | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run both measurements; write adapters.json and adapters.md under `out`; return the report."""
    from ti2i.export.tiny import write_random_lora
    from ti2i.triton_models.core import CoreOptions, EngineCore

    if clients < 1 or requests < 1 or rounds < 1 or rank < 1:
        raise InvalidInputError("--adapters needs ≥ 1 clients, requests, rounds and a rank ≥ 1")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache or default_cache_dir()).expanduser()
    chosen = get_preset(preset)
    model = model_dir(chosen, "sd", cache, log)
    engines = engine_dir(chosen, ["sd"], cache, log)
    request = chosen.request("sdedit")
    image = Image.open(EXAMPLE).convert("RGB").resize((request.width, request.height))
    with tempfile.TemporaryDirectory(prefix="ti2i-adapters-") as tmp:
        paths = [write_random_lora(model, Path(tmp) / f"a{i}", seed=i, rank=rank) for i in range(clients)]
        options = CoreOptions(active=clients, max_queue=clients, threads=0,
                              adapters=tuple((f"a{i}", str(p)) for i, p in enumerate(paths)))
        core = EngineCore(engines, [METHODS["sdedit"]], list(SDEDIT), options)
        core.load()
        try:
            log(f"adapters: {clients} clients × {requests} SDEdit requests, {rounds} rounds, rank {rank}")
            rates: dict[str, list[float]] = {mode: [] for mode in MODES}
            _throughput(core, image, request, clients, 1, "different")  # warm every adapter
            for _ in range(rounds):
                for mode in MODES:
                    rates[mode].append(_throughput(core, image, request, clients, requests, mode))
            unets = _unet_calls(core, engines, request, unet_calls, rounds, Path(tmp), log)
        finally:
            core.close()
    report = {"preset": preset, "clients": clients, "requests_per_client": requests, "rounds": rounds, "rank": rank,
              "machine": describe_machine(), "steps": request.steps, "size": [request.height, request.width],
              "throughput_rps": {m: statistics.median(r) for m, r in rates.items()}, "rounds_rps": rates,
              "unet_s": unets}
    t = report["throughput_rps"]
    report["different_vs_same"] = t["different"] / t["same"]
    report["adapter_vs_none_call"] = unets["adapter"] / unets["none"]
    report["inputs_vs_bare_call"] = unets["none"] / unets["bare"]
    (out / "adapters.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "adapters.md").write_text(_markdown(report))
    return report


def _throughput(core: Any, image: Image.Image, request: Any, clients: int, requests: int, mode: str) -> float:
    """Requests per second of `clients` threads, `requests` each, with the adapters `mode` says."""
    def client(index: int) -> None:
        lora = {"none": (), "same": ("a0",), "different": (f"a{index}",)}[mode]
        for r in range(requests):
            core.run_method("sdedit", {"image": image, "prompt": "a watercolor", "strength": request.strength,
                                       "steps": request.steps, "seed": r, "lora": lora},
                            "png", ["pixels"], token=f"{mode}-{index}-{r}-{time.monotonic_ns()}")

    return clients * requests / run_clients(client, clients)


def _unet_calls(core: Any, engines: Path, request: Any, calls: int, rounds: int, tmp: Path,
                log: Callable[[str], None]) -> dict[str, float]:
    """Median seconds of one UNet call (the CFG pair) with an adapter, without, and on a UNet without inputs."""
    from ti2i.engines.adapters import adapter_inputs
    from ti2i.spec import BATCH, sample_inputs

    runner = core.engines
    spec = runner.spec_of("unet")
    sizes = {BATCH: 2, "height": request.height // 8, "width": request.width // 8}
    plain = {k: v for k, v in sample_inputs(spec.interface(), sizes).items() if k not in RANK_AXES}
    adapted = {**plain, **adapter_inputs(runner.adapters.choose(["a0"]), "unet", 2)}
    bare = _bare_unet(engines, tmp, log)
    runs = {"adapter": lambda: runner.run("unet", **adapted), "none": lambda: runner.run("unet", **plain),
            "bare": lambda: bare.run(plain)}
    return interleaved_medians(runs, calls, rounds)


def _bare_unet(engines: Path, tmp: Path, log: Callable[[str], None]) -> Any:
    """The preset's UNet exported without adapter inputs (what a call cost before them), on ONNX Runtime."""
    import torch

    from ti2i.engines.ort import OrtEngine
    from ti2i.export.components import COMPONENTS, ModelSource
    from ti2i.export.exporter import export_onnx
    from ti2i.manifest import Manifest

    class Bare(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, ehs: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, timestep, encoder_hidden_states=ehs, return_dict=False)[0]

    manifest = Manifest.load(engines)
    component = COMPONENTS["unet"]
    source = manifest.components["unet"].source.split(" + ")[0]
    module = component.load(ModelSource(source), component.subfolder)
    spec = manifest.components["unet"].spec
    spec = replace(spec, inputs=tuple(t for t in spec.inputs if t.name not in RANK_AXES),
                   dims={k: v for k, v in spec.dims.items() if k != LORA_RANK})
    log("adapters: exporting the UNet without adapter inputs, for comparison")
    export_onnx(Bare(module).eval(), spec, component.sample_sizes[0], tmp / "bare_unet.onnx")
    return OrtEngine(tmp / "bare_unet.onnx", spec)


def _markdown(report: dict[str, Any]) -> str:
    t, u = report["throughput_rps"], report["unet_s"]
    lines = [f"# Per-request adapters: {report['preset']}, {report['size'][0]}×{report['size'][1]}, "
             f"{report['steps']} steps",
             "", f"Machine: {label(report['machine'])}. Rank {report['rank']}; medians of "
             f"{report['rounds']} interleaved rounds.", "",
             f"| {report['clients']} clients, SDEdit | requests/s |", "|---|---|"]
    lines += [f"| {mode} adapter{'s' if mode == 'different' else ''} | {t[mode]:.2f} |" for mode in MODES]
    lines += ["", f"Different adapters vs the same one: **{report['different_vs_same']:.2f}×** the throughput "
                  f"(goal ≥ 0.8×).", "",
              "| one UNet call (batch 2) | ms |", "|---|---|",
              f"| with an adapter | {u['adapter'] * 1e3:.2f} |", f"| without (rank-1 zeros) | {u['none'] * 1e3:.2f} |",
              f"| exported without adapter inputs | {u['bare'] * 1e3:.2f} |", "",
              f"A call with an adapter costs **{report['adapter_vs_none_call']:.2f}×** one without (goal ≤ 1.15×); "
              f"the adapter inputs cost a call without any adapter **{report['inputs_vs_bare_call']:.2f}×**.", ""]
    return "\n".join(lines)
