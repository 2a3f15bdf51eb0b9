"""What the figures were measured on: CPU, cores, memory, OS, GPU, library versions, git commit, load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from ti2i.engines.openvino import matrix_units

PROJECT_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tritonclient",
             "nvidia-pytriton", "numpy", "matplotlib", "tensorrt", "ti2i")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def gpus() -> list[dict[str, Any]]:
    try:
        import torch

        if torch.cuda.is_available():
            return [{"name": torch.cuda.get_device_name(i),
                     "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                     "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 1024**3, 1)}
                    for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA install must not stop a CPU benchmark
        pass
    return []


def describe_machine() -> dict[str, Any]:
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return {
        "cpu": _cpu_model(),
        "matrix_units": matrix_units(),  # the bf16 units OpenVINO's bf16 runs on (none: it runs fp32)
        "cores": cores,
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "hostname": platform.node(),
        "gpus": gpus(),
        "load_average_at_start": load_average(),
    }


def label(machine: dict[str, Any]) -> str:
    """One line naming the machine, for the README table."""
    gpu = machine.get("gpus") or []
    where = f"{gpu[0]['name']} GPU, " if gpu else ""
    units = machine.get("matrix_units")
    cpu = f"{machine.get('cpu')} ({', '.join(units) if units else 'no bf16 units'})" if units is not None \
        else machine.get("cpu")
    return (f"{where}{cpu}, {machine.get('usable_cores')} cores, {machine.get('memory_gib')} GiB, "
            f"{machine.get('os')}")


def versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import onnxruntime

        out["onnxruntime_providers"] = ",".join(onnxruntime.get_available_providers())
    except ImportError:
        pass
    return out


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
