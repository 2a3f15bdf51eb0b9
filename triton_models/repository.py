"""Generate a Triton model repository from an engine directory's manifest.

One python-backend model per component (hosting the same engine the in-process runner uses, with
dynamic batching), and one ensemble per fixed pre/post chain. Configs are built as Triton's own
`ModelConfig` protobuf and written with `text_format`, so they are valid by construction.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.engines.ensembles import Ensemble, available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.spec import BATCH, TRITON_DTYPES, ComponentSpec, TensorSpec

MODEL_FILE = Path(__file__).with_name("model.py")


@dataclass(frozen=True)
class RepositoryOptions:
    # How long a request may wait for others to batch with. 0: the batcher still merges every request that
    # queued while the model was busy (concurrent requests at different steps do batch), but a lone request
    # never waits; 2000 µs added ~2.7 ms to every call and lowered throughput at every concurrency (`ti2i bench`).
    max_queue_delay_us: int = 0
    instances: int = 1  # python-backend processes per component (each holds its own weights)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0 = all cores


def tensor_config(tensor: TensorSpec, batched: bool, output: bool = False, reshape: bool = True):
    """Triton dims leave out the batch dimension; a per-sample scalar travels as [1], reshaped to [] for a
    model (ensembles take it as [1]: Triton infers their tensors' shapes from the composing models)."""
    dims = [d if isinstance(d, int) else -1 for d in tensor.shape]
    if batched:
        assert tensor.shape[0] == BATCH, f"{tensor.name}: batched tensors start with the batch dim"
        dims = dims[1:]
    cls = mc.ModelOutput if output else mc.ModelInput
    config = cls(name=tensor.name, data_type=mc.DataType.Value("TYPE_" + TRITON_DTYPES[tensor.dtype]),
                 dims=dims or [1])
    if not dims and reshape:
        config.reshape.SetInParent()  # shape [] : the model sees [B]
    return config


def component_config(spec: ComponentSpec, manifest: Manifest, options: RepositoryOptions) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=spec.max_batch)
    config.input.extend(tensor_config(t, spec.batched) for t in spec.inputs)
    config.output.extend(tensor_config(t, spec.batched, output=True) for t in spec.outputs)
    if spec.batched:
        config.dynamic_batching.SetInParent()  # present even when every field keeps its default
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
    _parameters(config, engine_dir=str(manifest.root), component=spec.name, threads=str(options.threads),
                **{PIPELINE_PARAMETER: json.dumps(manifest.pipeline)})
    return config


def ensemble_config(ensemble: Ensemble, specs: dict[str, ComponentSpec], manifest: Manifest) -> mc.ModelConfig:
    spec = ensemble.spec(specs)
    config = mc.ModelConfig(name=ensemble.name, platform="ensemble", max_batch_size=spec.max_batch)
    config.input.extend(tensor_config(t, spec.batched, reshape=False) for t in spec.inputs)
    config.output.extend(tensor_config(t, spec.batched, output=True, reshape=False) for t in spec.outputs)
    for model, inputs, outputs in ensemble.wiring(specs):
        step = config.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update({name: name for name in inputs})
        step.output_map.update({name: name for name in outputs})
    _parameters(config, **{PIPELINE_PARAMETER: json.dumps(manifest.pipeline)})
    return config


def _parameters(config: mc.ModelConfig, **values: str) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def write_repository(manifest: Manifest, out_dir: str | Path, options: RepositoryOptions = RepositoryOptions(),
                     models: Iterable[str] | None = None, methods: Iterable[str] = (),
                     method_options: Any = None) -> Path:
    """Write (replacing) the repository; `models` limits it to some components and the ensembles they allow;
    `methods` adds those methods' models (triton_models/method_repository.py)."""
    out = Path(out_dir).resolve()
    if manifest.root == out or manifest.root.is_relative_to(out):
        raise InvalidInputError(f"the repository {out} would replace the engine directory {manifest.root}; "
                                f"write it elsewhere (e.g. {manifest.root / 'model_repository'})")
    names = list(models) if models is not None else list(manifest.components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise ModelNotFoundError(f"{manifest.root} has no {unknown} (has {sorted(manifest.components)})")
    if out.exists():
        _check_replaceable(out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    specs = {name: manifest.components[name].spec for name in names}
    for name, spec in specs.items():
        _write_model(out / name, component_config(spec, manifest, options), with_code=True)
    for ensemble in available_ensembles(specs):
        _write_model(out / ensemble.name, ensemble_config(ensemble, specs, manifest), with_code=False)
    if methods:
        from ti2i.triton_models.method_repository import MethodOptions, write_method_models

        write_method_models(out, manifest, methods, method_options or MethodOptions())
    return out


def _check_replaceable(out: Path) -> None:
    """Only a folder of model folders (each with a config.pbtxt) is replaced wholesale."""
    strangers = [p.name for p in out.iterdir() if not (p / "config.pbtxt").is_file()]
    if strangers:
        raise InvalidInputError(f"{out} exists and is not a model repository (it holds {sorted(strangers)[:5]}); "
                                f"choose an empty or new folder")


def _write_model(model_dir: Path, config: mc.ModelConfig, with_code: bool) -> None:
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    if with_code:
        shutil.copyfile(MODEL_FILE, version_dir / "model.py")


def parse_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema (raises on anything the server would reject as syntax)."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
