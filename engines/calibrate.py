"""Measure an engine's peak memory against request size, in a fresh process: the data of its `MemoryModel`.

Each measurement runs in a child process (``python -m ti2i.engines.calibrate``) so that what earlier
work left in the allocator's arenas cannot hide or inflate a peak: the child loads the engine, runs it
once at the smallest size (its resident size then is the model's `base`), then at a ladder of sizes
growing ×√2 in side (×2 in tokens), reading the kernel's peak-RSS counter (VmHWM) after each run. The
ladder stops once a run's growth reaches `target_bytes` (large enough that attention's quadratic term
is visible, small enough to measure on the exporting machine), at the declared maximum, or when a run
gets slow. Components with frames are measured a second time at 4× the frames to get their power.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ti2i.budget import MemoryModel, fit_growth
from ti2i.errors import ExportValidationError
from ti2i.spec import BATCH, ComponentSpec, derived_sizes, sample_inputs

TARGET_ENV = "TI2I_CALIBRATION_BYTES"
TARGET_BYTES = 1024**3  # stop the ladder once one item's run grows the process by this much
SLOW_S = 20.0  # ... or once one run takes this long
FRAMES_REF = 2
_TIMEOUT_S = 900


def layout(spec: ComponentSpec) -> dict[str, Any]:
    """Which dims count tokens, items and frames for this component's inputs."""
    used = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    tokens: tuple[str, ...] = ()
    for pair in (("height", "width"), ("image_height", "image_width")):
        if set(pair) <= used:
            tokens = pair
            break
    if spec.batched:
        items: tuple[str, ...] = (BATCH,)
        frames = "frames" if "frames" in used else None
    else:  # a chunk of frames of one video: its frames are its batch
        items = ("frames",) if "frames" in used else ()
        frames = None
    return {"token_dims": tokens, "item_dims": items, "frames_dim": frames}


def fit_memory(growths: list[tuple[float, float]], base: int) -> tuple[int, float, float]:
    """(base, linear, quadratic) from measured (tokens, growth per item) points and the loaded size.

    Growths below 1% of the loaded size are allocator noise and never decide a budget. A flat run at the
    small sizes (the same growth whatever the size: a fixed workspace) is an allocation floor, not growth
    per token: it joins the base, and the curve is fitted to the sizes where growth rises above twice the
    floor. (Fitted through the floor, a VAE encoder's 12 MiB at 8×8 became 13 GiB at 256².)
    """
    fit_points = [p for p in growths if p[1] >= 0.01 * base] or growths
    floor = min(y for _, y in fit_points)
    rising = [p for p in fit_points if p[1] >= 2 * floor]
    if len(rising) >= 2 and len(rising) < len(fit_points):
        base, fit_points = base + int(floor), rising
    elif len(fit_points) >= 3 and fit_points[1][1] <= 1.05 * fit_points[0][1]:
        # flat from the smallest sizes on and rising less than twice the floor by the end (SD 1.5's ControlNet:
        # 1 GiB at every size to 47², 1.7 GiB at 66²): the floor joins the base, the growth is what rises above it
        base, fit_points = base + int(floor), [(t, y - floor) for t, y in fit_points]
    linear, quadratic = fit_growth(fit_points)
    return base, linear, quadratic


def calibrate(onnx_path: str | Path, spec: ComponentSpec, target_bytes: int | None = None) -> MemoryModel:
    """Run the ladder in child processes and fit the component's memory model."""
    target = target_bytes or int(os.environ.get(TARGET_ENV, TARGET_BYTES))
    shape = layout(spec)
    job = {"onnx": str(onnx_path), "spec": spec.to_json(), "target": target, **shape}
    ladder = _child({**job, "mode": "ladder"})
    growths = [(float(x), float(y)) for x, y in ladder["points"]]
    base, linear, quadratic = fit_memory(growths, int(ladder["base"]))
    power = 1.0
    if shape["frames_dim"] is not None:
        side = ladder["frames_side"]
        frames = _child({**job, "mode": "frames", "side": side})
        power = min(2.0, max(1.0, math.log(max(frames["ratio"], 1.0)) / math.log(4)))
    return MemoryModel(base=base, linear=linear, quadratic=quadratic, frames_ref=FRAMES_REF,
                       frames_power=power, points=tuple(growths), **shape)


def _child(job: Mapping[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([_python(), "-m", "ti2i.engines.calibrate"], input=json.dumps(job), text=True,
                          capture_output=True, timeout=_TIMEOUT_S, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ExportValidationError(f"{job['spec']['name']}: memory calibration failed: {' | '.join(tail)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _python() -> str:
    """This interpreter; inside Triton's python-backend stub (an embedded interpreter), the first on PATH."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or shutil.which("python") or "python3"


# --------------------------------------------------------------------------- inside the child process


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _sizes(spec: ComponentSpec, job: Mapping[str, Any], side: int, items: int, frames: int) -> dict[str, int]:
    sizes = {d: lo for d, (lo, _) in spec.dims.items()}
    sizes.update({d: side for d in job["token_dims"]})
    for pixels, latent in (("image_height", "height"), ("image_width", "width")):
        if pixels in spec.dims and latent in job["token_dims"]:  # a ControlNet's image: the latent × the VAE factor
            sizes[pixels] = side * (spec.dims[pixels][1] // spec.dims[latent][1])
    sizes.update(derived_sizes(spec.dims, sizes))  # the downsampled sizes of a ControlNet's residuals
    sizes.update({d: items for d in job["item_dims"]})
    if job["frames_dim"] is not None:
        sizes[job["frames_dim"]] = frames
    return sizes


def _ladder(spec: ComponentSpec, job: Mapping[str, Any]) -> list[int]:
    """Sides from the smallest allowed (at least 8) to the declared maximum, ×√2 each."""
    if not job["token_dims"]:
        return [1]
    low = max(spec.dims[d][0] for d in job["token_dims"])
    high = min(spec.dims[d][1] for d in job["token_dims"])
    sides, side = [], max(low, 8)
    while side <= high:
        sides.append(side)
        side = max(side + 1, round(side * math.sqrt(2)))
    return sides


def _run_child(job: Mapping[str, Any]) -> dict[str, Any]:
    from ti2i.engines.ort import OrtEngine

    spec = ComponentSpec.from_json(job["spec"])
    engine = OrtEngine(job["onnx"], spec, threads=int(os.environ.get("OMP_NUM_THREADS", "1")))
    per_items = 2 if job["item_dims"] == ("frames",) else 1  # a frames chunk is measured at 2 frames
    if job["mode"] == "frames":
        side = job["side"]
        peaks = []
        engine.run(sample_inputs(spec, _sizes(spec, job, _ladder(spec, job)[0], 1, 1)))
        base = _status("VmRSS")
        for frames in (FRAMES_REF, 4 * FRAMES_REF):
            engine.run(sample_inputs(spec, _sizes(spec, job, side, 1, frames)))
            peaks.append(_status("VmHWM") - base)
        return {"ratio": peaks[1] / max(peaks[0], 1)}
    sides = _ladder(spec, job)
    engine.run(sample_inputs(spec, _sizes(spec, job, sides[0], per_items, FRAMES_REF)))
    base = _status("VmRSS")
    if not job["token_dims"]:  # fixed-size inputs: growth over the batch
        batch = spec.dims[job["item_dims"][0]][1] if job["item_dims"] else 1
        engine.run(sample_inputs(spec, {**_sizes(spec, job, 1, batch, FRAMES_REF)}))
        growth = (_status("VmHWM") - base) / batch
        return {"base": base, "points": [[1, growth]], "max_growth": growth, "frames_side": 1}
    points, frames_side = [], sides[0]
    for side in sides:
        start = time.perf_counter()
        engine.run(sample_inputs(spec, _sizes(spec, job, side, per_items, FRAMES_REF)))
        seconds = time.perf_counter() - start
        growth = max(_status("VmHWM") - base, points[-1][1] * per_items if points else 0) / per_items
        tokens = side ** len(job["token_dims"])
        points.append([tokens, growth])
        if growth * 8 <= job["target"]:
            frames_side = side  # frames × 4 here stays well inside the target
        if growth >= job["target"] or seconds >= SLOW_S:
            break
    return {"base": base, "points": points, "max_growth": points[-1][1], "frames_side": frames_side}


if __name__ == "__main__":
    print(json.dumps(_run_child(json.loads(sys.stdin.read()))))
