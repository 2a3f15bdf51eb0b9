"""Method models in the repository: `txt2img`, `sdedit`, ... and their streaming twins `METHOD_stream`.

Rendered from the method records: one optional input per parameter, named as the method's keyword
(the CLI flag with ``_`` for ``-``), the image inputs and `format` as BYTES; outputs `encoded`,
`encoded_base64`, `pixels`. The twin is decoupled (progress responses, then the result); a decoupled
model cannot answer a plain HTTP infer, hence two models. A model runs `active` requests at once (hosted:
as many loops spread over `processes` processes; bls: as many processes); the bounded queue rejects what
exceeds it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.client.methods import components_for
from ti2i.client.registry import METHODS, STREAM_SUFFIX, Method
from ti2i.errors import InvalidInputError
from ti2i.families import FAMILY_PARAMETER, served_name
from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.triton_models.method_server import BLS, DESIGNS, HOSTED
from ti2i.triton_models.repository import queue_policy

METHOD_MODEL_FILE = Path(__file__).with_name("method_model.py")
_DTYPES = {float: "TYPE_FP64", int: "TYPE_INT64", bool: "TYPE_BOOL", str: "TYPE_STRING"}


@dataclass(frozen=True)
class MethodOptions:
    # hosted: the engines in the method model's process, the active requests' loops batched step by step
    # (engines/step_scheduler.py); bls: the loop calls the component models (method_server.py)
    design: str = HOSTED
    active: int = 1  # requests one method model runs at once (hosted: threads of its processes; bls: instances)
    # hosted: the active requests' loops spread over this many processes (Triton instances), each holding its own
    # copy of the engines: loops in different processes share no GIL, at the price of the weights once more each.
    # The processes share the model's `active` places (places.py), so no request waits while one is free
    processes: int = 1
    # hosted: each process's step scheduler splits its requests into this many lanes that tick on their own, so
    # one lane's engine call runs beside another lane's Python (engines/step_scheduler.py): what processes give,
    # with one copy of the weights
    lanes: int = 1
    # hosted: intra-op threads of each process's engines (0: the cores split among the processes and their lanes,
    # so that busy ones do not oversubscribe them; more favours a lone request on a large model over many small)
    threads: int = 0
    max_queue: int = 8  # requests waiting for an instance; one more is rejected (UNAVAILABLE)
    queue_timeout_us: int = 0  # how long a request may wait (0: no limit; a client may ask for less)
    # True: import the loop (torch, diffusers) when an instance loads, so "ready" means warm. False (default): at an
    # instance's first request (seconds), so a server with every method model starts fast: preloading the 8 method
    # processes of one SD engine directory took `ti2i serve` from ~25 s to 75-100 s to ready on 2 loaded cores.
    preload: bool = False

    max_wait_ms: float = 10.0  # hosted: how long a tick waits for a busy loop's next call before running without it
    cancel_poll_ms: float = 20.0  # how often the watcher asks Triton whether the active requests were cancelled

    def __post_init__(self) -> None:
        if self.design not in DESIGNS:
            raise InvalidInputError(f"method design must be one of {', '.join(DESIGNS)}, got {self.design!r}")
        for name, low in (("active", 1), ("processes", 1), ("lanes", 1), ("threads", 0), ("max_queue", 0),
                          ("queue_timeout_us", 0), ("cancel_poll_ms", 1)):
            if getattr(self, name) < low:
                raise InvalidInputError(f"method model {name.replace('_', ' ')} must be ≥ {low}, "
                                        f"got {getattr(self, name)}")
        if self.processes > 1 and self.design != HOSTED:
            raise InvalidInputError(f"method processes apply to the hosted design (bls already runs one process per "
                                    f"active request), got {self.processes} with {self.design}")
        if self.processes > self.active:
            raise InvalidInputError(f"method model processes ({self.processes}) cannot exceed its active requests "
                                    f"({self.active}): a process without a request to run only holds weights")
        if self.lanes > 1 and self.design != HOSTED:
            raise InvalidInputError(f"method lanes apply to the hosted design (bls loops call the component models), "
                                    f"got {self.lanes} with {self.design}")
        if self.processes * self.lanes > self.active:
            raise InvalidInputError(f"method model processes × lanes ({self.processes} × {self.lanes}) cannot exceed "
                                    f"its active requests ({self.active}): a lane without a request to run is idle")

    @property
    def instances(self) -> int:
        """Triton instances of the method model: hosted, its processes; bls, one per active request."""
        return self.processes if self.design == HOSTED else self.active


def servable_methods(components: Iterable[str]) -> list[str]:
    """The methods whose every model is among `components`."""
    have = set(components)
    return [name for name in METHODS if set(components_for([name])) <= have]


def _tensor(cls, name: str, dtype: str, dims: list[int], optional: bool = False):
    tensor = cls(name=name, data_type=mc.DataType.Value(dtype), dims=dims)
    if optional:
        tensor.optional = True
    return tensor


def method_config(method: Method, manifest: Manifest, options: MethodOptions, stream: bool = False,
                  family: str | None = None, budgets: Mapping[str, int] | None = None,
                  suffix: str = "") -> mc.ModelConfig:
    """`family`: served as ``<family>.<method>`` beside that family's components (which a bls loop calls);
    `budgets`: the bytes each engine a hosted model holds may use, by component (None: the stub's machine
    budget);
    `suffix`: served as METHOD + suffix (and its twin + _stream), e.g. a second design beside the first."""
    name = method.name + suffix + (STREAM_SUFFIX if stream else "")
    config = mc.ModelConfig(name=served_name(family, name), backend="python", max_batch_size=0)
    # every input optional: the model names what is missing, and parameters left out take the record's defaults
    for name in method.images:
        config.input.append(_tensor(mc.ModelInput, name, "TYPE_STRING", [1], optional=True))
    for param in method.params:
        config.input.append(_tensor(mc.ModelInput, param.name, _DTYPES[param.kind], [1], optional=True))
    config.input.append(_tensor(mc.ModelInput, "format", "TYPE_STRING", [1], optional=True))
    pixel_dims = [-1, -1, 3] if method.output == "image" else [-1, -1, -1, 3]
    config.output.extend([_tensor(mc.ModelOutput, "encoded", "TYPE_STRING", [1]),
                          _tensor(mc.ModelOutput, "encoded_base64", "TYPE_STRING", [1]),
                          _tensor(mc.ModelOutput, "pixels", "TYPE_UINT8", pixel_dims)])
    if stream:
        config.input.append(_tensor(mc.ModelInput, "preview_every", "TYPE_INT64", [1], optional=True))
        config.output.extend([_tensor(mc.ModelOutput, "stage", "TYPE_STRING", [1]),
                              _tensor(mc.ModelOutput, "step", "TYPE_INT64", [1]),
                              _tensor(mc.ModelOutput, "steps", "TYPE_INT64", [1]),
                              _tensor(mc.ModelOutput, "elapsed", "TYPE_FP64", [1]),
                              _tensor(mc.ModelOutput, "preview", "TYPE_UINT8", [-1, -1, 3])])
        config.model_transaction_policy.decoupled = True
    # hosted: its processes run the `active` loops side by side; bls: one process per active request
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=options.instances)
    if options.design == BLS:  # hosted: the model keeps its own queue (method_server.MethodQueue), Triton none
        queue_policy(config, options.max_queue, options.queue_timeout_us)
    budget = {c: budgets[c] for c in components_for([method.name]) if c in budgets} if budgets else None
    values = {"method": method.name, "engine_dir": str(manifest.root), "defaults": json.dumps(method.defaults()),
              "preload": "1" if options.preload else "0", "design": options.design,
              "active": str(options.active), "processes": str(options.processes), "lanes": str(options.lanes),
              "threads": str(options.threads),
              "max_wait_ms": f"{options.max_wait_ms:g}", "cancel_poll_ms": f"{options.cancel_poll_ms:g}",
              "max_queue": str(options.max_queue), "queue_timeout_us": str(options.queue_timeout_us),
              **({"memory_budget": json.dumps(budget)} if budget is not None else {}),
              PIPELINE_PARAMETER: json.dumps(manifest.pipeline), **({FAMILY_PARAMETER: family} if family else {})}
    for key, value in values.items():
        config.parameters[key].string_value = value
    return config


def write_method_models(out: Path, manifest: Manifest, methods: Iterable[str],
                        options: MethodOptions = MethodOptions(), family: str | None = None,
                        budgets: Mapping[str, int] | None = None, suffix: str = "") -> list[str]:
    """Write each method's model and streaming twin into the repository `out` (its components already there);
    `budgets`: bytes per engine of a hosted model, by component."""
    written = []
    served = {p.name for p in Path(out).iterdir() if (p / "config.pbtxt").is_file()}
    for name in methods:
        if name not in METHODS:
            raise InvalidInputError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
        missing = [c for c in components_for([name]) if served_name(family, c) not in served]
        if missing:
            raise InvalidInputError(f"method {name} needs the models {missing}, which the repository lacks")
        for stream in (False, True):
            config = method_config(METHODS[name], manifest, options, stream, family, budgets, suffix)
            model_dir = Path(out) / config.name
            (model_dir / "1").mkdir(parents=True)
            (model_dir / "config.pbtxt").write_text(text_format.MessageToString(config))
            shutil.copyfile(METHOD_MODEL_FILE, model_dir / "1" / "model.py")
            written.append(config.name)
    return written
