"""What a ControlNet costs a denoising step (`ti2i bench --controlnet`), measured side by side in one run.

One step of the preset's SD model (the CFG pair at its size, on ONNX Runtime) without a ControlNet (the UNet)
beside one with (the ControlNet, then the UNet that takes its residuals). The ControlNet is a random one made
from the preset's UNet (`write_random_controlnet`), exported beside it once into the bench cache. Variants
alternate round by round; each figure is the median of its rounds. Results: controlnet.json and controlnet.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ti2i.benchmarks.machine import describe_machine, label
from ti2i.benchmarks.presets import BUILD_VERSION, default_cache_dir, get_preset, model_dir
from ti2i.benchmarks.stats import interleaved_medians
from ti2i.engines.adapters import RANK_AXES
from ti2i.errors import InvalidInputError


def run_controlnet_bench(out: Path, preset: str = "tiny", calls: int = 10, rounds: int = 3,
                         cache: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time both steps; write controlnet.json and controlnet.md under `out`; return the report."""
    from ti2i.client.runners import InProcessRunner
    from ti2i.spec import BATCH, sample_inputs

    if calls < 1 or rounds < 1:
        raise InvalidInputError("--controlnet needs ≥ 1 calls and rounds")
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache or default_cache_dir()).expanduser()
    chosen = get_preset(preset)
    request = chosen.request("txt2img")
    engines = _engines(chosen, cache, log)
    sizes = {BATCH: 2, "height": request.height // 8, "width": request.width // 8,
             "image_height": request.height, "image_width": request.width}
    with InProcessRunner(engines) as runner:
        unet = _plain(sample_inputs(runner.spec_of("unet").interface(), sizes, seed=1))
        control = sample_inputs(runner.spec_of("controlnet_bench").interface(), sizes, seed=2)

        def controlled() -> None:
            residuals = runner.run("controlnet_bench", **control)
            runner.run("unet_control", **unet, **residuals)

        runs = {"unet": lambda: runner.run("unet", **unet), "controlnet_and_unet": controlled}
        step_s = interleaved_medians(runs, calls, rounds)
    report = {"preset": preset, "size": [request.height, request.width], "calls": calls, "rounds": rounds,
              "machine": describe_machine(), "step_s": step_s,
              "controlnet_vs_plain_step": step_s["controlnet_and_unet"] / step_s["unet"]}
    (out / "controlnet.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "controlnet.md").write_text(_markdown(report))
    return report


def _plain(inputs: dict[str, Any]) -> dict[str, Any]:
    """The UNet's inputs without adapters (what a request without any sends)."""
    return {k: v for k, v in inputs.items() if k not in RANK_AXES}


def _engines(preset: Any, cache: Path, log: Callable[[str], None]) -> Path:
    """The preset's SD engines with a random ControlNet of its UNet, exported once into the cache."""
    from ti2i.export.exporter import export_model
    from ti2i.export.tiny import write_random_controlnet

    root = cache / preset.name / f"v{BUILD_VERSION}" / "controlnet"
    engines = root / "engines"
    if not (root / ".complete").is_file():
        model = model_dir(preset, "sd", cache, log)
        net = write_random_controlnet(model, root / "bench", seed=0)
        log(f"[export] {preset.name}: the SD engines with a ControlNet, to {engines} (once; cached)")
        export_model(str(model), engines, log=lambda line: log(f"[export]   {line}"), controlnets=[str(net)])
        (root / ".complete").write_text("ok\n")
    return engines


def _markdown(report: dict[str, Any]) -> str:
    s = report["step_s"]
    return "\n".join([
        f"# ControlNet: {report['preset']}, {report['size'][0]}×{report['size'][1]}, one step (batch 2)", "",
        f"Machine: {label(report['machine'])}. Medians of {report['rounds']} interleaved rounds of "
        f"{report['calls']} steps.", "",
        "| step | ms |", "|---|---|",
        f"| UNet | {s['unet'] * 1e3:.2f} |",
        f"| ControlNet + the UNet taking its residuals | {s['controlnet_and_unet'] * 1e3:.2f} |", "",
        f"A step with a ControlNet costs **{report['controlnet_vs_plain_step']:.2f}×** one without.", ""])
