"""Method models and the engine core in the repository.

Method models `txt2img`, `sdedit`, ... and their streaming twins `METHOD_stream` are rendered from the
method records: one optional input per parameter, named as the method's keyword (the CLI flag with ``_``
for ``-``), the image inputs and `format` as BYTES; outputs `encoded`, `encoded_base64`, `pixels`. The twin
is decoupled (progress responses, then the result); a decoupled model cannot answer a plain HTTP infer,
hence two models. Both are entry points (`entry.py`) into the family's core, whose config (`core_config`)
declares the convention of `core_wire.py` and carries the operator's `CoreOptions`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.client.methods import components_for, runs_on
from ti2i.client.registry import METHODS, STREAM_SUFFIX, Method
from ti2i.errors import InvalidInputError
from ti2i.families import FAMILY_PARAMETER, served_name
from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.spec import TRITON_DTYPES, ComponentSpec
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.core_wire import ERROR, IMAGE_INPUTS, REQUEST, component_tensor, core_name
from ti2i.triton_models.method_io import OUTPUTS, STREAM_OUTPUTS

METHOD_MODEL_FILE = Path(__file__).with_name("method_model.py")
_DTYPES = {float: "TYPE_FP64", int: "TYPE_INT64", bool: "TYPE_BOOL", str: "TYPE_STRING"}
_RESULT_TENSORS = {"encoded": ("TYPE_STRING", [1]), "encoded_base64": ("TYPE_STRING", [1])}
_STREAM_TENSORS = {"stage": ("TYPE_STRING", [1]), "step": ("TYPE_INT64", [1]), "steps": ("TYPE_INT64", [1]),
                   "elapsed": ("TYPE_FP64", [1]), "preview": ("TYPE_UINT8", [-1, -1, 3])}
assert set(_RESULT_TENSORS) | {"pixels"} == set(OUTPUTS) and set(_STREAM_TENSORS) == set(STREAM_OUTPUTS)


def servable_methods(components: Iterable[str]) -> list[str]:
    """The methods an engine directory with `components` serves (`client.methods.runs_on`)."""
    have = set(components)
    return [name for name in METHODS if runs_on(name, have)]


def _tensor(cls, name: str, dtype: str, dims: list[int], optional: bool = False):
    tensor = cls(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
    if optional:
        tensor.optional = True
    return tensor


def _parameters(config: mc.ModelConfig, values: Mapping[str, str]) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def method_config(method: Method, manifest: Manifest, stream: bool = False,
                  family: str | None = None) -> mc.ModelConfig:
    """`family`: served as ``<family>.<method>``, forwarding to that family's core."""
    name = method.name + (STREAM_SUFFIX if stream else "")
    config = mc.ModelConfig(name=served_name(family, name), backend="python", max_batch_size=0)
    # every input optional: the model names what is missing, and parameters left out take the record's defaults
    for name in method.all_images:
        config.input.append(_tensor(mc.ModelInput, name, "TYPE_STRING", [1], optional=True))
    for param in method.params:
        config.input.append(_tensor(mc.ModelInput, param.name, _DTYPES[param.kind], [-1 if param.many else 1],
                                    optional=True))
    config.input.append(_tensor(mc.ModelInput, "format", "TYPE_STRING", [1], optional=True))
    pixel_dims = [-1, -1, 3] if method.output == "image" else [-1, -1, -1, 3]
    config.output.extend(_tensor(mc.ModelOutput, n, *t) for n, t in _RESULT_TENSORS.items())
    config.output.append(_tensor(mc.ModelOutput, "pixels", "TYPE_UINT8", pixel_dims))
    if stream:
        config.input.append(_tensor(mc.ModelInput, "preview_every", "TYPE_INT64", [1], optional=True))
        config.output.extend(_tensor(mc.ModelOutput, n, *t) for n, t in _STREAM_TENSORS.items())
        config.model_transaction_policy.decoupled = True
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _parameters(config, {"method": method.name, "core": core_name(family),
                         "defaults": json.dumps(method.defaults()), PIPELINE_PARAMETER: json.dumps(manifest.pipeline),
                         **({FAMILY_PARAMETER: family} if family else {})})
    return config


def core_config(manifest: Manifest, specs: Mapping[str, ComponentSpec], methods: Iterable[str],
                options: CoreOptions, budgets: Mapping[str, int] | None = None,
                family: str | None = None) -> mc.ModelConfig:
    """The family's engine core: one decoupled instance; the tensors of `core_wire.py` (`specs`: the served
    components' wire declarations); `budgets`: the bytes each engine may use, by component."""
    config = mc.ModelConfig(name=core_name(family), backend="python", max_batch_size=0)
    config.input.append(_tensor(mc.ModelInput, REQUEST, "TYPE_STRING", [1]))
    for name in IMAGE_INPUTS:
        config.input.append(_tensor(mc.ModelInput, name, "TYPE_STRING", [1], optional=True))
    config.output.extend(_tensor(mc.ModelOutput, n, *t) for n, t in {**_RESULT_TENSORS, **_STREAM_TENSORS}.items())
    config.output.append(_tensor(mc.ModelOutput, "pixels", "TYPE_UINT8", [-1, -1, -1, 3]))  # [F, H, W, 3]
    config.output.append(_tensor(mc.ModelOutput, ERROR, "TYPE_STRING", [1]))  # a stream's failure (core_wire.py)
    for spec in specs.values():
        for tensors, cls in ((spec.inputs, mc.ModelInput), (spec.outputs, mc.ModelOutput)):
            for t in tensors:
                dims = [d if isinstance(d, int) else -1 for d in t.shape] or [1]
                config_tensor = _tensor(cls, component_tensor(spec.name, t.name), "TYPE_" + TRITON_DTYPES[t.dtype],
                                        dims, optional=cls is mc.ModelInput)
                (config.input if cls is mc.ModelInput else config.output).append(config_tensor)
    config.model_transaction_policy.decoupled = True
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    settings = dataclasses.asdict(options)
    _parameters(config, {"engine_dir": str(manifest.root), "methods": json.dumps(list(methods)),
                         "components": json.dumps(list(specs)),
                         "options": json.dumps(settings),
                         **({"memory_budget": json.dumps(dict(budgets))} if budgets else {}),
                         PIPELINE_PARAMETER: json.dumps(manifest.pipeline),
                         **({FAMILY_PARAMETER: family} if family else {})})
    return config


def write_method_models(out: Path, manifest: Manifest, methods: Iterable[str], family: str | None = None) -> list[str]:
    """Write each method's model and streaming twin into the repository `out` (its components already there)."""
    written = []
    served = {p.name for p in Path(out).iterdir() if (p / "config.pbtxt").is_file()}
    for name in methods:
        if name not in METHODS:
            raise InvalidInputError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
        missing = [c for c in components_for([name], manifest.components) if served_name(family, c) not in served]
        if missing:
            raise InvalidInputError(f"method {name} needs the models {missing}, which the repository lacks")
        if not runs_on(name, manifest.components):
            raise InvalidInputError(f"method {name} does not run on the SDXL models of {manifest.root} (they serve "
                                    f"{', '.join(servable_methods(manifest.components))})")
        for stream in (False, True):
            config = method_config(METHODS[name], manifest, stream, family)
            model_dir = Path(out) / config.name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
            shutil.copyfile(METHOD_MODEL_FILE, model_dir / "1" / "model.py")
            written.append(config.name)
    return written
