"""The engine directory's manifest: what export wrote, read by engines, the Triton generator and clients.

``manifest.json`` lists every component (its spec, where its engine file is, how it validated) and
the pipeline-level facts the sampling loops need (scheduler config, VAE scaling factor, tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ti2i.budget import MemoryModel
from ti2i.errors import ModelNotFoundError
from ti2i.spec import ComponentSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2

# The model-config parameter of every served model that carries the manifest's pipeline facts to clients.
PIPELINE_PARAMETER = "ti2i_pipeline"

# Backends an entry can name: an ONNX graph run by ONNX Runtime, or a library processing step.
ONNX = "onnx"
PROCESSING = "processing"


@dataclass
class ComponentEntry:
    spec: ComponentSpec
    backend: str  # ONNX or PROCESSING
    file: str | None = None  # relative to the engine directory, for ONNX entries
    validation: dict[str, Any] | None = None  # relative error against the torch module per sample size
    source: str | None = None  # the model folder or hub id it was exported from
    fingerprint: str | None = None  # sha256 of its weights
    memory: MemoryModel | None = None  # peak memory against request size, measured at export
    precision: str | None = None  # "fp32" or "fp16": the graph's float type (None: fp32, older manifests)
    declaration: str | None = None  # the component declaration it was exported from, when not its name (SDXL's)

    @property
    def declared_as(self) -> str:
        """Its declaration's name in `export/components.py` (the served name unless it says otherwise)."""
        return self.declaration or self.spec.name

    def to_json(self) -> dict[str, Any]:
        data = {"spec": self.spec.to_json(), "backend": self.backend, "file": self.file,
                "validation": self.validation, "source": self.source, "fingerprint": self.fingerprint,
                **({"precision": self.precision} if self.precision else {}),
                **({"declaration": self.declaration} if self.declaration else {})}
        if self.memory is not None:
            data["memory"] = self.memory.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComponentEntry:
        memory = data.get("memory")  # manifests written before memory calibration have none
        return cls(ComponentSpec.from_json(data["spec"]), data["backend"], data.get("file"), data.get("validation"),
                   data.get("source"), data.get("fingerprint"), None if memory is None else MemoryModel.from_json(memory),
                   data.get("precision"), data.get("declaration"))


@dataclass
class Manifest:
    """Everything an engine directory holds, as one JSON document next to the engine files."""

    root: Path
    precision: str
    pipeline: dict[str, Any]
    components: dict[str, ComponentEntry] = field(default_factory=dict)
    tool_versions: dict[str, str] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # model kind -> the model it was exported from

    @property
    def kinds(self) -> list[str]:
        return list(self.sources)

    def path_of(self, name: str) -> Path:
        entry = self.components[name]
        if entry.file is None:
            raise ModelNotFoundError(f"component {name!r} has no engine file")
        return self.root / entry.file

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "sources": self.sources,
            "precision": self.precision,
            "pipeline": self.pipeline,
            "components": {name: entry.to_json() for name, entry in self.components.items()},
            "tool_versions": self.tool_versions,
        }

    def write(self) -> Path:
        path = self.root / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, engine_dir: str | Path) -> Manifest:
        root = Path(engine_dir).resolve()
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise ModelNotFoundError(f"engine directory {root} does not exist (run `ti2i export` first)")
        if not path.is_file():
            raise ModelNotFoundError(f"{root} has no {MANIFEST_NAME}: not an engine directory written by `ti2i export`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ModelNotFoundError(f"{path} is not valid JSON ({err}); export the model again") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else None
            raise ModelNotFoundError(f"{path}: manifest format {found} is not {FORMAT_VERSION}; "
                                     f"export the model again with this version of ti2i")
        try:
            return cls._from_json(root, data)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelNotFoundError(f"{path}: incomplete manifest ({err!r}); export the model again") from None

    @classmethod
    def _from_json(cls, root: Path, data: dict[str, Any]) -> Manifest:
        return cls(
            root=root,
            sources=data["sources"],
            precision=data["precision"],
            pipeline=data["pipeline"],
            components={n: ComponentEntry.from_json(e) for n, e in data["components"].items()},
            tool_versions=data.get("tool_versions", {}),
        )
