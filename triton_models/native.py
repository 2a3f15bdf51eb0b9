"""Model repositories served by Triton's native backends: `tensorrt_plan` and `onnxruntime_onnx`.

The networks run in Triton's own C++ backends on GPU instances (no python stub in the data path);
tokenization and the uint8 pre/post steps stay python models, and the same ensembles wire them to
the networks. Rules Triton enforces and the generated configs keep:

* a `tensorrt_plan` model's ``max_batch_size`` must not exceed the plan's profile maximum (Triton
  refuses the model otherwise): it is the smaller of the declared batch range and the profile's;
* CUDA graphs (``optimization.cuda.graphs``) need static shapes: enabled only for static profiles,
  with the one shape as their ``graph_spec``;
* an ensemble's tensors keep one data type end to end: a python step next to an fp16 network
  declares its tensor fp16 too (it computes in float32 and casts at its boundary).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.engines import profiles
from ti2i.engines.builds import BuildIndex
from ti2i.engines.ensembles import available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import ONNX, PIPELINE_PARAMETER, Manifest
from ti2i.spec import ComponentSpec
from ti2i.triton_models.repository import (
    RepositoryOptions,
    component_config,
    ensemble_config,
    tensor_config,
    write_repository,
)

BACKENDS = ("python", "tensorrt", "onnxruntime")
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}
MODEL_FILES = {"tensorrt": "model.plan", "onnxruntime": "model.onnx"}


@dataclass(frozen=True)
class NativeOptions:
    gpus: tuple[int, ...] = ()  # GPU ids of each instance group (empty: every GPU)
    instances: int = 1  # instances per GPU
    cuda_graphs: bool = True  # tensorrt_plan: capture CUDA graphs where the profile is static
    tensorrt_accelerator: bool = False  # onnxruntime_onnx: TensorRT execution provider (fp16) before CUDA


def native_config(spec: ComponentSpec, backend: str, manifest: Manifest, options: RepositoryOptions,
                  native: NativeOptions, prof: profiles.Profile | None = None) -> mc.ModelConfig:
    """The config of one network on a native backend (`prof`: the TensorRT plan's profile)."""
    max_batch = spec.max_batch
    if backend == "tensorrt":
        if prof is None:
            raise InvalidInputError(f"{spec.name}: a tensorrt_plan config needs the plan's profile")
        max_batch = min(max_batch, profiles.max_batch(spec, prof)) if spec.batched else 0
    config = mc.ModelConfig(name=spec.name, platform=PLATFORMS[backend], max_batch_size=max_batch,
                            default_model_filename=MODEL_FILES[backend])
    config.input.extend(tensor_config(t, spec.batched) for t in spec.inputs)
    config.output.extend(tensor_config(t, spec.batched, output=True) for t in spec.outputs)
    if spec.batched:
        config.dynamic_batching.SetInParent()
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=native.instances)
    group.gpus.extend(native.gpus)
    if backend == "tensorrt" and native.cuda_graphs and profiles.is_static(prof):
        _cuda_graph(config, spec, prof)
    if backend == "onnxruntime" and native.tensorrt_accelerator:
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
    config.parameters[PIPELINE_PARAMETER].string_value = json.dumps(manifest.pipeline)
    return config


def _cuda_graph(config: mc.ModelConfig, spec: ComponentSpec, prof: profiles.Profile) -> None:
    """One CUDA graph for the profile's single shape (Triton's graph_spec leaves out the batch dim)."""
    config.optimization.cuda.graphs = True
    graph = config.optimization.cuda.graph_spec.add()
    if spec.batched:
        graph.batch_size = config.max_batch_size
    for tensor in spec.inputs:
        shape = list(prof[tensor.name][1])
        dims = shape[1:] if spec.batched else shape
        graph.input[tensor.name].dim.extend(dims or [1])


def neighbour_dtypes(steps: dict[str, ComponentSpec], networks: dict[str, ComponentSpec]
                     ) -> dict[str, ComponentSpec]:
    """The python steps' specs with each tensor an fp16 network shares in fp16 (ensembles need one type)."""
    graph_types = {t.name: t.dtype for s in networks.values() for t in (*s.inputs, *s.outputs)
                   if t.dtype == "float16"}
    out = {}
    for name, spec in steps.items():
        def follow(tensor):
            return replace(tensor, dtype=graph_types.get(tensor.name, tensor.dtype))

        out[name] = replace(spec, inputs=tuple(map(follow, spec.inputs)), outputs=tuple(map(follow, spec.outputs)))
    return out


def write_native_repository(manifest: Manifest, out_dir: str | Path, backend: str,
                            options: RepositoryOptions = RepositoryOptions(),
                            native: NativeOptions = NativeOptions(), models: Iterable[str] | None = None) -> Path:
    """The python repository, then every network replaced by its native model and the python steps and
    ensembles re-rendered with the networks' data types."""
    if backend not in BACKENDS:
        raise InvalidInputError(f"unknown repository backend {backend!r} (known: {', '.join(BACKENDS)})")
    out = write_repository(manifest, out_dir, options, models)
    if backend == "python":
        return out
    names = list(models) if models is not None else list(manifest.components)
    networks = [n for n in names if manifest.components[n].backend == ONNX]
    index = BuildIndex.load(manifest.root, "tensorrt") if backend == "tensorrt" else None
    if index is not None:
        missing = [n for n in networks if n not in index.entries or not index.path(n).is_file()]
        if missing:
            raise ModelNotFoundError(f"{manifest.root} has no TensorRT plans for {missing}: run "
                                     f"`ti2i build --backend tensorrt --engines {manifest.root}` on the GPU first")
    graph_specs = {n: manifest.components[n].spec for n in networks}
    python_steps = {n: manifest.components[n].spec.interface() for n in names if n not in networks}
    steps = neighbour_dtypes(python_steps, graph_specs) | graph_specs
    for name in names:
        model_dir = out / name
        if name in networks:
            prof = index.profile(name) if index is not None else None
            config = native_config(graph_specs[name], backend, manifest, options, native, prof)
            (model_dir / "1" / "model.py").unlink()
            _link_model_file(manifest, name, backend, index, model_dir / "1")
        else:
            config = component_config(steps[name], manifest, options)
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    for ensemble in available_ensembles(steps):
        config = ensemble_config(ensemble, steps, manifest)
        (out / ensemble.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return out


def _link_model_file(manifest: Manifest, name: str, backend: str, index: BuildIndex | None, version: Path) -> None:
    """The model file as a link into the engine directory (plans and graphs are large; never copied)."""
    if backend == "tensorrt":
        (version / MODEL_FILES[backend]).symlink_to(index.path(name).resolve())
        return
    graph = manifest.path_of(name)
    (version / MODEL_FILES[backend]).symlink_to(graph)
    data = graph.with_name(graph.name + ".data")
    if data.is_file():  # external weights are found by their recorded name, beside the graph
        (version / data.name).symlink_to(data)
