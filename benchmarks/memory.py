"""Memory of one served model family: what its server holds with one method warm, then with all of them warm.

The family's engine core loads each engine once, whichever method model, stream twin or component model
calls it, so warming more methods should add their own engines (an inpainting UNet, a motion UNet) and
little else. This starts a server on the preset's engine directory (every SD kind of the preset: the
plain, InstructPix2Pix and inpainting UNets and the motion UNet side by side), sends one request of the
first method and reads the PSS of the server's process tree (tritonserver and its python-backend stubs),
then one request of every method and of its `_stream` twin, and reads it again. Usage:

    python -m ti2i.benchmarks.memory --preset sd15-256 [--methods all] [--out memory.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from PIL import Image

from ti2i.benchmarks.backends import method_kwargs
from ti2i.benchmarks.cpu_time import process_tree
from ti2i.benchmarks.harness import EXAMPLE
from ti2i.benchmarks.machine import describe_machine
from ti2i.benchmarks.presets import METHOD_KINDS, default_cache_dir, engine_dir, get_preset
from ti2i.client.registry import METHODS
from ti2i.client.remote import RemoteMethodClient
from ti2i.manifest import Manifest
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

SETTLE_S = 2.0  # after the last request, before reading: freed buffers go back first


def pss_mb(root_pid: int) -> float:
    """Proportional set size of a process and all its descendants, MB (shared pages split between sharers)."""
    total_kb = 0
    for pid in process_tree(root_pid):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # the process has gone
        found = re.search(r"^Pss:\s+(\d+) kB", rollup, re.M)
        total_kb += int(found.group(1)) if found else 0
    return total_kb / 1024


def measure(preset_name: str, methods: list[str], cache: Path, log: Any = print) -> dict[str, Any]:
    """PSS at start, with `methods[0]` warm, and with every method and its stream twin warm."""
    preset = get_preset(preset_name)
    kinds = list(dict.fromkeys(METHOD_KINDS[m] for m in methods))
    if "svd" in kinds:
        raise ValueError("svd is a family of its own: measure it alone")
    engines = engine_dir(preset, kinds, cache, log)
    out = cache / preset.name / "memory-repository"
    write_repository(Manifest.load(engines), out, methods=methods, core_options=CoreOptions(active=1))
    image = Image.open(EXAMPLE).convert("RGB")
    readings: dict[str, Any] = {"preset": preset.name, "engine_dir": str(engines), "methods": methods,
                                "machine": describe_machine(), "after": {}}
    with TritonServer(out, log_path=out.parent / "memory-server.log", startup_timeout_s=1800) as server:
        readings["start_mb"] = pss_mb(server.pid)
        log(f"[memory] at start: {readings['start_mb']:.0f} MB")
        with RemoteMethodClient(f"grpc://{server.grpc_url}", timeout_s=3600) as client:
            for i, method in enumerate(methods):
                request = preset.request(method)
                picture = image.resize((request.width, request.height))
                for stream in (False, True):
                    client.run(METHODS[method], progress=False, stream=stream, model=method,
                               **method_kwargs(method, picture, request, seed=0))
                time.sleep(SETTLE_S)
                readings["after"][method] = pss_mb(server.pid)
                log(f"[memory] {method} and its stream warm too: {readings['after'][method]:.0f} MB")
                if i == 0:
                    readings["one_warm_mb"] = readings["after"][method]
    readings["all_warm_mb"] = readings["after"][methods[-1]]
    readings["ratio"] = readings["all_warm_mb"] / readings["one_warm_mb"]
    return readings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--methods", default="all",
                        help="comma-separated, the first measured alone; all: every method of the SD family")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the readings here (JSON)")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    if args.methods == "all":
        methods = ["sdedit", *(m for m in METHODS if m not in ("sdedit", "svd") and m in preset.requests)]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    readings = measure(preset.name, methods, args.cache or default_cache_dir())
    print(f"{preset.name}: PSS {readings['start_mb']:.0f} MB at start, {readings['one_warm_mb']:.0f} MB with "
          f"{methods[0]} warm, {readings['all_warm_mb']:.0f} MB with {', '.join(methods)} and their streams warm: "
          f"{readings['ratio']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(readings, indent=2) + "\n")


if __name__ == "__main__":
    main()
