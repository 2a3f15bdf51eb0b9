"""Model repositories served by Triton's native backends: `tensorrt_plan`, `onnxruntime_onnx` and `torch_aoti`.

The networks run in Triton's own C++ backends on GPU instances (no python stub in the data path);
tokenization and the uint8 pre/post steps stay python models, and the same ensembles wire them to
the networks. Rules Triton enforces and the generated configs keep:

* a `tensorrt_plan` model's ``max_batch_size`` must not exceed the plan's profile maximum (Triton
  refuses the model otherwise): it is the smaller of the declared batch range and the profile's;
* CUDA graphs (``optimization.cuda.graphs``) need static shapes: enabled only for static profiles,
  with the one shape as their ``graph_spec``;
* an ensemble's tensors keep one data type end to end: a python step next to an fp16 network
  declares its tensor fp16 too (it computes in float32 and casts at its boundary);
* `torch_aoti` (the pytorch backend's AOTInductor platform, Triton 26.03+, beta) batches nothing above 1
  and addresses tensors by their position in the package's call spec: each package is served as
  ``NAME_aoti`` with ``max_batch_size`` 0 (full dims, batch included) and names ``INPUT__i``/``OUTPUT__i``
  in the declaration's order (the order our wrappers take and return them), and an ensemble under the
  component's own name gives clients the declared names and batching. Ensembles that compose it
  (`encode_prompt`, ...) call ``NAME_aoti`` directly: a batching ensemble may hold a non-batching model
  when the expanded shapes agree (Triton core, `ValidateEnsembleConfig`).

Every native model keeps the python models' bounded queue (`default_queue_policy`).
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
    bounded_queue,
    component_config,
    ensemble_config,
    tensor_config,
    write_repository,
)

BACKENDS = ("python", "tensorrt", "onnxruntime", "aoti")
PLATFORMS = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx", "aoti": "torch_aoti"}
MODEL_FILES = {"tensorrt": "model.plan", "onnxruntime": "model.onnx", "aoti": "model.pt2"}
BUILT = ("tensorrt", "aoti")  # backends whose models are `ti2i build` outputs, not the ONNX graphs
AOTI_SUFFIX = "_aoti"  # the served name of a component's AOTInductor package (the component's name is its alias)


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
    bounded_queue(config, options, spec.batched)
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


def positional_names(spec: ComponentSpec) -> tuple[dict[str, str], dict[str, str]]:
    """Declared tensor name -> the torch_aoti name of its position (``INPUT__i``, ``OUTPUT__i``)."""
    return ({t.name: f"INPUT__{i}" for i, t in enumerate(spec.inputs)},
            {t.name: f"OUTPUT__{i}" for i, t in enumerate(spec.outputs)})


def aoti_config(spec: ComponentSpec, manifest: Manifest, options: RepositoryOptions, native: NativeOptions,
                device: str) -> mc.ModelConfig:
    """The `torch_aoti` model of one AOTInductor package (built for `device`: its instances run there)."""
    config = mc.ModelConfig(name=spec.name + AOTI_SUFFIX, backend="pytorch", platform=PLATFORMS["aoti"],
                            max_batch_size=0, default_model_filename=MODEL_FILES["aoti"])
    inputs, outputs = positional_names(spec)
    config.input.extend(tensor_config(replace(t, name=inputs[t.name]), False) for t in spec.inputs)
    config.output.extend(tensor_config(replace(t, name=outputs[t.name]), False, output=True) for t in spec.outputs)
    bounded_queue(config, options, batched=False)
    if device == "cpu":
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=native.instances)
    else:
        group = config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=native.instances)
        group.gpus.extend(native.gpus)
    config.parameters[PIPELINE_PARAMETER].string_value = json.dumps(manifest.pipeline)
    return config


def aoti_alias_config(spec: ComponentSpec, manifest: Manifest) -> mc.ModelConfig:
    """The component's own name and declared tensors, as an ensemble of one step over its torch_aoti model:
    clients (and the client-driven loops) call it exactly as they call the python or TensorRT model."""
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=spec.max_batch)
    config.input.extend(tensor_config(t, spec.batched) for t in spec.inputs)
    config.output.extend(tensor_config(t, spec.batched, output=True) for t in spec.outputs)
    inputs, outputs = positional_names(spec)
    step = config.ensemble_scheduling.step.add(model_name=spec.name + AOTI_SUFFIX, model_version=-1)
    step.input_map.update({position: name for name, position in inputs.items()})
    step.output_map.update({position: name for name, position in outputs.items()})
    config.parameters[PIPELINE_PARAMETER].string_value = json.dumps(manifest.pipeline)
    return config


def _call_by_position(config: mc.ModelConfig, specs: dict[str, ComponentSpec]) -> None:
    """An ensemble's steps over AOTInductor networks call their torch_aoti models by position directly."""
    for step in config.ensemble_scheduling.step:
        if step.model_name not in specs:
            continue
        inputs, outputs = positional_names(specs[step.model_name])
        step.model_name += AOTI_SUFFIX
        for tensors, positions in ((step.input_map, inputs), (step.output_map, outputs)):
            wiring = dict(tensors)
            tensors.clear()
            tensors.update({positions[inner]: outer for inner, outer in wiring.items()})


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
    out = write_repository(manifest, out_dir, options, models, core_options=None)
    if backend == "python":
        return out
    names = list(models) if models is not None else list(manifest.components)
    networks = [n for n in names if manifest.components[n].backend == ONNX]
    index = BuildIndex.load(manifest.root, backend) if backend in BUILT else None
    if index is not None:
        built = [n for n in networks if n in index.entries and index.path(n).is_file()]
        if backend == "tensorrt" and built != networks:
            raise ModelNotFoundError(f"{manifest.root} has no TensorRT plans for {sorted(set(networks) - set(built))}: "
                                     f"run `ti2i build --backend tensorrt --engines {manifest.root}` on the GPU first")
        if not built:
            raise ModelNotFoundError(f"{manifest.root} has no AOTInductor packages: run "
                                     f"`ti2i build --backend aoti --engines {manifest.root}` first")
        networks = built  # aoti: a component torch.export could not package stays a python (ONNX Runtime) model
    graph_specs = {n: manifest.components[n].spec for n in networks}
    python_steps = {n: manifest.components[n].spec.interface() for n in names if n not in networks}
    steps = neighbour_dtypes(python_steps, graph_specs) | graph_specs
    for name in names:
        model_dir = out / name
        if name in networks and backend == "aoti":
            _write_aoti(graph_specs[name], manifest, options, native, index, out)
            (model_dir / "1" / "model.py").unlink()  # an ensemble keeps its (empty) version folder
            config = aoti_alias_config(graph_specs[name], manifest)
        elif name in networks:
            prof = index.profile(name) if index is not None else None
            config = native_config(graph_specs[name], backend, manifest, options, native, prof)
            (model_dir / "1" / "model.py").unlink()
            _link_model_file(manifest, name, backend, index, model_dir / "1")
        else:
            config = component_config(steps[name], manifest, options)
        (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    for ensemble in available_ensembles(steps):
        config = ensemble_config(ensemble, steps, manifest, adapter_inputs=True)
        if backend == "aoti":
            _call_by_position(config, graph_specs)
        (out / ensemble.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return out


def _write_aoti(spec: ComponentSpec, manifest: Manifest, options: RepositoryOptions, native: NativeOptions,
                index: BuildIndex, out: Path) -> None:
    model_dir = out / (spec.name + AOTI_SUFFIX)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    config = aoti_config(spec, manifest, options, native, index.entries[spec.name].get("device", "cpu"))
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    _link_model_file(manifest, spec.name, "aoti", index, model_dir / "1")


def _link_model_file(manifest: Manifest, name: str, backend: str, index: BuildIndex | None, version: Path) -> None:
    """The model file as a link into the engine directory (plans and graphs are large; never copied)."""
    if backend in BUILT:
        (version / MODEL_FILES[backend]).symlink_to(index.path(name).resolve())
        return
    graph = manifest.path_of(name)
    (version / MODEL_FILES[backend]).symlink_to(graph)
    data = graph.with_name(graph.name + ".data")
    if data.is_file():  # external weights are found by their recorded name, beside the graph
        (version / data.name).symlink_to(data)
