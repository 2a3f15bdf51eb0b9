"""Compiled engines kept beside the ONNX graphs, each under a key of everything it depends on.

A TensorRT plan is valid only for the graph, the TensorRT version, the GPU (name and compute
capability) and the shape profile it was built for; an AOTInductor package for the weights, the
torch version, the device and its shapes. The key hashes all of them; the index (``builds.json``
in the backend's folder) records each component's key, file and facts. A build whose key no
longer matches is stale: it is rebuilt, never loaded. Pure functions and JSON: no TensorRT needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ti2i.engines import profiles
from ti2i.errors import ModelNotFoundError

INDEX_NAME = "builds.json"


def file_fingerprint(path: Path) -> str:
    """sha256 of a graph file and its external weights."""
    digest = hashlib.sha256()
    for part in (path, path.with_name(path.name + ".data")):
        if part.is_file():
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def build_key(facts: Mapping[str, Any]) -> str:
    """sha256 of the facts (canonical JSON): equal facts, equal key; any change, another key."""
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def plan_facts(onnx_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
               profile: profiles.Profile) -> dict[str, Any]:
    """What a TensorRT plan depends on."""
    return {"backend": "tensorrt", "onnx": onnx_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name,
            "compute_capability": compute_capability, "profile": profiles.to_json(profile)}


def aoti_facts(weights_sha256: str, torch_version: str, device: str, precision: str,
               profile: profiles.Profile, dynamic: bool) -> dict[str, Any]:
    """What an AOTInductor package depends on."""
    return {"backend": "aoti", "weights": weights_sha256, "torch": torch_version, "device": device,
            "precision": precision, "profile": profiles.to_json(profile), "dynamic": dynamic}


@dataclass
class BuildIndex:
    """The builds of one backend in one engine directory (``ENGINES/<backend>/builds.json``)."""

    root: Path
    entries: dict[str, dict[str, Any]]

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str) -> BuildIndex:
        root = Path(engine_dir) / backend
        path = root / INDEX_NAME
        entries = json.loads(path.read_text()) if path.is_file() else {}
        return cls(root, entries)

    def fresh(self, name: str, key: str) -> Path | None:
        """The build of `name` if it exists under `key` (None: missing or stale)."""
        entry = self.entries.get(name)
        if entry is None or entry.get("key") != key:
            return None
        path = self.root / entry["file"]
        return path if path.is_file() else None

    def record(self, name: str, key: str, file: str, facts: Mapping[str, Any], **extra: Any) -> None:
        old = self.entries.get(name)
        if old is not None and old.get("file") != file:
            (self.root / old["file"]).unlink(missing_ok=True)  # the stale build goes
        self.entries[name] = {"key": key, "file": file, "facts": dict(facts), **extra}
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / INDEX_NAME).write_text(json.dumps(self.entries, indent=2, sort_keys=True) + "\n")

    def path(self, name: str) -> Path:
        """The recorded build of `name` (its freshness is the builder's business, checked at build time)."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelNotFoundError(f"{self.root} has no build of {name!r}: run `ti2i build` first")
        return self.root / entry["file"]

    def profile(self, name: str) -> profiles.Profile:
        return profiles.from_json(self.entries[name]["facts"]["profile"])


def file_name(name: str, key: str, suffix: str) -> str:
    return f"{name}-{key[:16]}{suffix}"
