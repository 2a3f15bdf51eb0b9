"""Generate a Triton model repository from an engine directory's manifest.

With an engine core (`core_options`, what `ti2i serve` writes): the family's `core` model holds every
engine once (`core_server.py`), and one entry-point model per component and per method (and its stream
twin) forwards its requests to it (`entry.py`); one ensemble per fixed pre/post chain wires the component
models. Without one (the python steps of a native repository, `native.py`): one python-backend model per
component hosting its own engine, with dynamic batching. Configs are built as Triton's own `ModelConfig`
protobuf and written with `text_format`, so they are valid by construction.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.budget import BUDGET_ENV, SAFE_SHARE, format_bytes, machine_budget
from ti2i.engines.adapters import RANK_AXES
from ti2i.engines.ensembles import Ensemble, available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.families import FAMILY_PARAMETER, served_name
from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.spec import BATCH, TRITON_DTYPES, ComponentSpec, TensorSpec
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.core_wire import core_name, write_secret

MODEL_FILE = Path(__file__).with_name("model.py")
ENTRY_FILE = Path(__file__).with_name("component_model.py")
CORE_FILE = Path(__file__).with_name("core_model.py")


@dataclass(frozen=True)
class RepositoryOptions:
    # How long a request may wait for others to batch with. 0: the batcher still merges every request that
    # queued while the model was busy (concurrent requests at different steps do batch), but a lone request
    # never waits; 2000 µs added ~2.7 ms to every call and lowered throughput at every concurrency (`ti2i bench`).
    max_queue_delay_us: int = 0
    instances: int = 1  # python-backend processes per component (each holds its own weights)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0 = all cores
    # Bytes all model instances may use together (None: TI2I_MEMORY_BUDGET, else a safe share of the memory
    # available now), split evenly among the instances of the components with a measured memory model.
    memory_budget: int | None = None
    # Bounded queues (every component model): a request that waited `queue_timeout_us` without starting, or that
    # finds `max_queue_size` requests waiting, is refused with UNAVAILABLE (a request's own timeout overrides the default). Sized from
    # the measured service time: the SD 1.5 UNet serves one request (batch 2, 256²) in 0.93 s on 2 cores (docs/benchmarks.md
    # figures), so 32 queued requests take ≈30 s to drain, about the default timeout; a request that cannot
    # start within 30 s is better told at once (an unbounded queue kept 32 clients waiting 34 s median, 52 s
    # p99, and ran requests whose clients had given up). 0: unbounded, no queue policy at all, which is also
    # what keeps Triton 2.51's dynamic batcher clear of a lost wake-up: with any queue policy it waits for a free
    # instance on a condition the finishing instance may signal too early, and a request then sits 500 ms
    # (`ti2i.benchmarks.queue_stall`: 18 of 3000 sequential requests with one core busy; none without a policy,
    # none with two instances).
    max_queue_size: int = 32
    queue_timeout_us: int = 30_000_000


def tensor_config(tensor: TensorSpec, batched: bool, output: bool = False, reshape: bool = True,
                  optional: bool = False):
    """Triton dims leave out the batch dimension; a per-sample scalar travels as [1], reshaped to [] for a
    model (ensembles take it as [1]: Triton infers their tensors' shapes from the composing models).
    `optional`: the model fills what a request leaves out (the "no adapter" of adapter inputs)."""
    dims = [d if isinstance(d, int) else -1 for d in tensor.shape]
    if batched:
        assert tensor.shape[0] == BATCH, f"{tensor.name}: batched tensors start with the batch dim"
        dims = dims[1:]
    cls = mc.ModelOutput if output else mc.ModelInput
    config = cls(name=tensor.name, data_type=mc.DataType.Value("TYPE_" + TRITON_DTYPES[tensor.dtype]),
                 dims=dims or [1])
    if not dims and reshape:
        config.reshape.SetInParent()  # shape [] : the model sees [B]
    if optional and not output:
        config.optional = True
    return config


def _inputs(spec: ComponentSpec) -> list:
    """A python model's input configs: adapter inputs optional (the engine core fills "no adapter")."""
    return [tensor_config(t, spec.batched, optional=t.name in RANK_AXES) for t in spec.inputs]


def entry_config(spec: ComponentSpec, manifest: Manifest, family: str | None = None) -> mc.ModelConfig:
    """A component's entry point: the declared tensors, its calls forwarded to the family's core (which bounds
    and batches them: no Triton queue here)."""
    config = mc.ModelConfig(name=served_name(family, spec.name), backend="python", max_batch_size=spec.max_batch)
    config.input.extend(_inputs(spec))
    config.output.extend(tensor_config(t, spec.batched, output=True) for t in spec.outputs)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    _parameters(config, engine_dir=str(manifest.root), component=spec.name, core=core_name(family),
                **{PIPELINE_PARAMETER: json.dumps(manifest.pipeline)})
    _family_parameter(config, family)
    return config


def component_config(spec: ComponentSpec, manifest: Manifest, options: RepositoryOptions,
                     budget: int | None = None, family: str | None = None) -> mc.ModelConfig:
    """A python model hosting the component's engine (a native repository's python steps). `budget`: bytes per
    instance (None: the stub's machine budget); `spec`'s batch range fits it (`budgeted_spec`)."""
    config = mc.ModelConfig(name=served_name(family, spec.name), backend="python", max_batch_size=spec.max_batch)
    config.input.extend(_inputs(spec))
    config.output.extend(tensor_config(t, spec.batched, output=True) for t in spec.outputs)
    bounded_queue(config, options, spec.batched)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
    _parameters(config, engine_dir=str(manifest.root), component=spec.name, threads=str(options.threads),
                **({"memory_budget": str(budget)} if budget is not None else {}),
                **{PIPELINE_PARAMETER: json.dumps(manifest.pipeline)})
    _family_parameter(config, family)
    return config


def bounded_queue(config: mc.ModelConfig, options: RepositoryOptions, batched: bool) -> None:
    """Every component model gets the dynamic batcher's bounded queue; with max_batch_size 0 (a chunk of video
    frames, a torch_aoti package) Triton still runs each request alone, but it waits in the same bounded queue.
    `max_queue_size` 0: the dynamic batcher without a queue policy (unbounded, no timeout)."""
    config.dynamic_batching.SetInParent()
    if batched:
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    if options.max_queue_size == 0:
        return
    queue_policy(config, options.max_queue_size, options.queue_timeout_us)


def queue_policy(config: mc.ModelConfig, max_queue_size: int, timeout_us: int) -> None:
    """Refuse (UNAVAILABLE) a request that finds `max_queue_size` waiting or waited `timeout_us` without
    starting; a request's own timeout overrides the default. Component and method models share it."""
    policy = config.dynamic_batching.default_queue_policy
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = timeout_us
    policy.allow_timeout_override = True
    policy.max_queue_size = max_queue_size


def instance_budgets(manifest: Manifest, names: Iterable[str], options: RepositoryOptions,
                     shared: bool = False) -> dict[str, int]:
    """Each instance's budget, by component: its own weights plus an even share of what the weights of every
    engine-backed instance leave of the total; `shared` (an engine core), all of what they leave.

    An even split of the whole total would give SD 1.5's UNet (3.4 GiB of weights) the same 3.5 GiB of a
    14 GiB machine as the 0.4 GiB VAE encoder, leaving it room for batch 1 only, while the VAE's share sat
    unused. The pre/post-processing steps (numpy on a request's own arrays, no weights) get the headroom
    share without taking one: counting them would shrink everyone's headroom for steps that need little.
    Without a memory calibration a component's weights count as 0 (the share is then the even split).
    An engine core holds one instance of each, and its scheduler holds each running call's estimate against
    the one headroom, so calls running together never pass it: a split would only refuse, say, a motion UNet's
    frames the headroom holds while the other components' shares sit idle.
    """
    names = list(names)
    total = options.memory_budget if options.memory_budget is not None else machine_budget()
    measured = [n for n in names if manifest.components[n].file is not None]

    def weights(name: str) -> int:
        memory = manifest.components[name].memory
        return memory.base if memory is not None and name in measured else 0

    held = options.instances * sum(weights(n) for n in measured)
    if held > total:  # every request would be refused: say so now, once
        told = "given" if options.memory_budget is not None else f"{SAFE_SHARE:.0%} of the memory available now"
        raise InvalidInputError(f"the engines of {', '.join(measured)} hold {format_bytes(held)} of weights, over the "
                                f"memory budget of {format_bytes(total)} ({told}): serve fewer methods or "
                                f"components, or raise the budget (--memory-budget or {BUDGET_ENV})")
    headroom = (total - held) // (1 if shared else max(1, len(measured) * options.instances))
    return {name: weights(name) + headroom for name in names}


def budgeted_spec(spec: ComponentSpec, manifest: Manifest, budget: int) -> ComponentSpec:
    """The spec with its batch range cut to what fits `budget` at the smallest sizes (the batcher's maximum)."""
    memory = manifest.components[spec.name].memory
    if not spec.batched or memory is None:
        return spec
    smallest = {dim: low for dim, (low, _) in spec.dims.items()}
    low, high = spec.dims[BATCH]
    fit = max(low, min(high, memory.affordable_items(smallest, budget)))
    return replace(spec, dims={**spec.dims, BATCH: (low, fit)})


def ensemble_config(ensemble: Ensemble, specs: dict[str, ComponentSpec], manifest: Manifest,
                    family: str | None = None, adapter_inputs: bool = False) -> mc.ModelConfig:
    """`adapter_inputs`: the chain takes its steps' adapter inputs (native networks require them); else they are
    left to the steps, which fill "no adapter" (adapters reach a text encoder in a method's request)."""
    spec = ensemble.spec(specs)
    config = mc.ModelConfig(name=served_name(family, ensemble.name), platform="ensemble",
                            max_batch_size=spec.max_batch)
    kept = {t.name for t in spec.inputs if adapter_inputs or t.name not in RANK_AXES}
    config.input.extend(tensor_config(t, spec.batched, reshape=False) for t in spec.inputs if t.name in kept)
    config.output.extend(tensor_config(t, spec.batched, output=True, reshape=False) for t in spec.outputs)
    for model, inputs, outputs in ensemble.wiring(specs):
        step = config.ensemble_scheduling.step.add(model_name=served_name(family, model), model_version=-1)
        step.input_map.update({name: name for name in inputs if name in kept or name not in RANK_AXES})
        step.output_map.update({name: name for name in outputs})
    _parameters(config, **{PIPELINE_PARAMETER: json.dumps(manifest.pipeline)})
    _family_parameter(config, family)
    return config


def _family_parameter(config: mc.ModelConfig, family: str | None) -> None:
    if family is not None:  # an unnamed family's configs stay exactly as they were
        _parameters(config, **{FAMILY_PARAMETER: family})


def _parameters(config: mc.ModelConfig, **values: str) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def write_repository(manifest: Manifest, out_dir: str | Path, options: RepositoryOptions = RepositoryOptions(),
                     models: Iterable[str] | None = None, family: str | None = None, replace: bool = True,
                     methods: Iterable[str] = (), core_options: CoreOptions | None = CoreOptions()) -> Path:
    """Write (replacing) the repository; `models` limits it to some components and the ensembles they allow;
    `core_options` (`core.CoreOptions`) serves them through the family's engine core, with the `methods`'
    models (triton_models/method_repository.py); None: each component model hosts
    its own engine (a native repository's python steps).

    With `family`, every model is served as ``<family>.<name>``; `replace=False` adds to an existing repository
    (several families side by side, see `ti2i.triton_models.families`)."""
    out = Path(out_dir).resolve()
    if manifest.root == out or manifest.root.is_relative_to(out):
        raise InvalidInputError(f"the repository {out} would replace the engine directory {manifest.root}; "
                                f"write it elsewhere (e.g. {manifest.root / 'model_repository'})")
    names = list(models) if models is not None else list(manifest.components)
    unknown = [n for n in names if n not in manifest.components]
    if unknown:
        raise ModelNotFoundError(f"{manifest.root} has no {unknown} (has {sorted(manifest.components)})")
    if out.exists() and replace:
        _check_replaceable(out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=not replace)
    budgets = instance_budgets(manifest, names, options, shared=core_options is not None)
    # python models exchange float32 (the engines cast for fp16 graphs); the batch range fits the budget
    specs = {name: budgeted_spec(manifest.components[name].spec, manifest, budgets[name]).interface()
             for name in names}
    for name, spec in specs.items():
        if core_options is None:
            _write_model(out / served_name(family, name),
                         component_config(spec, manifest, options, budgets[name], family), MODEL_FILE)
        else:
            _write_model(out / served_name(family, name), entry_config(spec, manifest, family), ENTRY_FILE)
    for ensemble in available_ensembles(specs):
        _write_model(out / served_name(family, ensemble.name), ensemble_config(ensemble, specs, manifest, family),
                     None)
    if core_options is not None:
        from ti2i.triton_models.method_repository import core_config, write_method_models

        methods = list(methods)
        _write_model(out / core_name(family), core_config(manifest, specs, methods, core_options, budgets, family),
                     CORE_FILE)
        write_secret(out / core_name(family))
        write_method_models(out, manifest, methods, family=family)
    elif methods:
        raise InvalidInputError("method models are served through an engine core: give core_options")
    return out


def _check_replaceable(out: Path) -> None:
    """Only a folder of model folders (each with a config.pbtxt) is replaced wholesale."""
    strangers = [p.name for p in out.iterdir() if not (p / "config.pbtxt").is_file()]
    if strangers:
        raise InvalidInputError(f"{out} exists and is not a model repository (it holds {sorted(strangers)[:5]}); "
                                f"choose an empty or new folder")


def _write_model(model_dir: Path, config: mc.ModelConfig, code: Path | None) -> None:
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
    if code is not None:
        shutil.copyfile(code, version_dir / "model.py")


def parse_config(path: str | Path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema (raises on anything the server would reject as syntax)."""
    return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
