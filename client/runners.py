"""Runners: run a model (a component or an ensemble) by name, named numpy arrays in and out.

The methods only ever talk to a runner. `InProcessRunner` calls the engines of an engine directory
directly (ensembles as the same chain of calls the server makes); `TritonRunner` sends the same
calls to a Triton server over gRPC or HTTP. Both expose the pipeline facts from the manifest.
The methods' loops call `run_tensors` (torch tensors on the runner's device): `InProcessRunner` keeps
them on its engines' device, the Triton runners send them as numpy (`ti2i.runner`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from http.client import HTTPException
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines.adapters import ADAPTER_MODULES, LORA_DOWN, LORA_UP, AdapterRegistry, with_defaults
from ti2i.engines.base import Engine
from ti2i.engines.ensembles import available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError, named_error
from ti2i.families import Family, choose_family, families_from_configs, served_name, split_served_name
from ti2i.manifest import Manifest
from ti2i.runner import Runner, to_numpy, to_torch  # Runner re-exported: the interface lives below client/
# and triton_models/
from ti2i.spec import ComponentSpec


class FamilyRoutingRunner(Runner):
    """A client-side runner that may reach several model families: it routes a method to the family that
    serves it (`for_method`), or to the one named with `family=`.
    """

    # The model families it reaches (ti2i.families), and the one chosen with family= (None: found per method).
    families: dict[str | None, Family] = {}
    family: str | None = None
    _pipeline: dict[str, Any] | None = None

    @property
    def pipeline(self) -> dict[str, Any]:
        """The pipeline facts of the family this runner calls (a method binds it with `for_method`)."""
        if self._pipeline is None:
            names = ", ".join(sorted(f.label for f in self.families.values()))
            raise ModelNotFoundError(f"several model families are served ({names}): use runner.for_method(NAME) "
                                     f"or runner.for_family(NAME), or pass family=NAME")
        return self._pipeline

    @pipeline.setter
    def pipeline(self, facts: dict[str, Any]) -> None:
        self._pipeline = facts

    def for_method(self, method: str) -> Runner:
        """This runner bound to the family that serves `method` (itself when it reaches one unnamed family)."""
        if not self.families or (list(self.families) == [None] and self.family is None):
            return self
        from ti2i.client.methods import METHOD_MODELS

        return self._bound(choose_family(self.families, METHOD_MODELS.get(method, ()), self.family, purpose=method))

    def for_family(self, name: str | None) -> Runner:
        """This runner bound to the family `name`: `run("unet")` then calls that family's UNet."""
        return self._bound(choose_family(self.families, (), name, purpose=f"family {name!r}"))

    def _bound(self, family: Family) -> Runner:
        return self if family.name is None else FamilyRunner(self, family)


class FamilyRunner(FamilyRoutingRunner):
    """One family of a runner that reaches several: plain model names in, the family's served names out."""

    def __init__(self, base: Runner, family: Family):
        self.base, self.family, self.families = base, family.name, {family.name: family}
        self._family = family
        self.pipeline = family.pipeline

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.base.run(self._family.served(model), outputs, **inputs)

    @property
    def device(self) -> Any:
        return self.base.device

    def run_tensors(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        return self.base.run_tensors(self._family.served(model), outputs, **inputs)

    def run_to_host(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        return self.base.run_to_host(self._family.served(model), outputs, **inputs)

    def for_method(self, method: str) -> Runner:
        return self.base.for_method(method)

    def for_family(self, name: str | None) -> Runner:
        return self.base.for_family(name)

    def __getattr__(self, name: str) -> Any:  # the base runner's other attributes (model_config, protocol, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class InProcessRunner(FamilyRoutingRunner):
    """Engines loaded from an engine directory on first use, in this process.

    `engine_dir` may map family names to engine directories (`ti2i.families`): each family then gets its
    own runner, found per method by `for_method`, or fixed with `family=`.
    """

    def __init__(self, engine_dir: str | Path | Mapping[str | None, str | Path], family: str | None = None,
                 **engine_options: Any):
        from ti2i.engines.loader import load_engine

        self.family = family
        self._device = engine_options.get("device", "cpu")
        self._children: dict[str, InProcessRunner] = {}
        self._engines: dict[str, Engine] = {}
        self._loading = threading.Lock()
        self._adapters: AdapterRegistry | None = None
        if isinstance(engine_dir, Mapping):
            if list(engine_dir) != [None]:
                self._children = {name: InProcessRunner(path, **engine_options) for name, path in engine_dir.items()}
                self.families = {name: Family(name, child.pipeline, child.families[None].models)
                                 for name, child in self._children.items()}
                if family is not None:
                    self.pipeline = choose_family(self.families, (), family).pipeline
                elif len(self.families) == 1:
                    self.pipeline = next(iter(self.families.values())).pipeline
                return
            engine_dir = engine_dir[None]
        self.manifest = Manifest.load(engine_dir)
        self.pipeline = self.manifest.pipeline
        self._load = lambda name: load_engine(self.manifest, name, **engine_options)
        specs = {name: entry.spec.interface() for name, entry in self.manifest.components.items()}
        self._ensembles = {e.name: (e.spec(specs), e.wiring(specs)) for e in available_ensembles(specs)}
        self.families = {None: Family(None, self.pipeline, frozenset([*self.manifest.components, *self._ensembles]))}
        if family is not None:
            choose_family(self.families, (), family)  # one unnamed family: naming one is an error that says so

    def _bound(self, family: Family) -> Runner:
        return self._children[family.name] if family.name is not None else self

    def spec_of(self, model: str) -> ComponentSpec:
        """The declaration of a component or ensemble this runner runs (one family's runner only)."""
        if model in self._ensembles:
            return self._ensembles[model][0]
        if model in self.manifest.components:
            return self.manifest.components[model].spec
        raise ModelNotFoundError(f"no model {model!r} in {self.manifest.root}")

    def _completed(self, model: str, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
        """The inputs, with the engine's "no adapter" where a model that takes adapters was sent none."""
        try:
            return with_defaults(self.spec_of(model), inputs)
        except ModelNotFoundError:
            return inputs  # the call reports the unknown model

    @property
    def adapters(self) -> AdapterRegistry:
        """The LoRA adapters requests may name: files, loaded on first use (a server registers names instead)."""
        if self._children:
            raise InvalidInputError("per-request adapters need one model family: choose one with --family")
        if self._adapters is None:
            self._adapters = AdapterRegistry(self.pipeline.get(ADAPTER_MODULES, {}))
        return self._adapters

    @adapters.setter
    def adapters(self, registry: AdapterRegistry) -> None:
        self._adapters = registry

    def engine(self, name: str) -> Engine:
        if name not in self._engines:
            with self._loading:  # threads that run loops side by side load each engine once
                if name not in self._engines:
                    self._engines[name] = self._load(name)
        return self._engines[name]

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        if self._children:  # several families: a served name, <family>.<model>
            family, plain = split_served_name(model)
            if family not in self._children:
                raise ModelNotFoundError(f"no model {model!r}: families are {sorted(self._children)}; "
                                         f"models are named <family>.<model>")
            return self._children[family].run(plain, outputs, **inputs)
        inputs = self._completed(model, inputs)
        if model in self._ensembles:
            spec, wiring = self._ensembles[model]
            spec.validate_inputs(inputs)
            tensors: dict[str, np.ndarray] = dict(inputs)
            for step, step_inputs, _ in wiring:
                tensors.update(self.engine(step).run({k: tensors[k] for k in step_inputs}))
            result = tensors
        elif model in self.manifest.components:
            result = self.engine(model).run(inputs)
        else:
            raise ModelNotFoundError(f"no model {model!r} in {self.manifest.root}")
        wanted = outputs or [k for k in result if k not in inputs]
        return {k: result[k] for k in wanted}

    @property
    def device(self) -> Any:
        """The engines' device (the ``device`` engine option): where `run_tensors` returns its tensors."""
        import torch

        return torch.device(self._device)

    def run_tensors(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        """A component or an ensemble on torch tensors, returned on the engines' device.

        Engines that live on a device (AOTInductor packages, TensorRT plans) take and return device
        tensors without a host round trip; the others (ONNX Runtime, the processing steps) get the
        tensors as numpy on the host, exactly as `run` would, and their results are moved to the device
        once. An ensemble chains its steps so: on a GPU, `encode_prompt` tokenizes on the host and
        encodes on the device. The seeded generator of the methods stays on the CPU and its draws are
        moved once (as diffusers' `randn_tensor` does).
        """
        result = self._run_chain(model, inputs, outputs)
        device = self.device
        return {k: v.to(device) if hasattr(v, "to") else to_torch(v, device) for k, v in result.items()}

    def run_to_host(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: Any) -> dict[str, Any]:
        """As `run_tensors`, the outputs as numpy on the host: a decode's images come back once."""
        return {k: to_numpy(v) for k, v in self._run_chain(model, inputs, outputs).items()}

    def _run_chain(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None) -> dict[str, Any]:
        """Each output where the step that made it left it: a torch tensor on the device, or numpy."""
        if self._children:
            family, plain = split_served_name(model)
            if family not in self._children:
                raise ModelNotFoundError(f"no model {model!r}: families are {sorted(self._children)}; "
                                         f"models are named <family>.<model>")
            return self._children[family]._run_chain(plain, inputs, outputs)
        inputs = self._completed(model, inputs)
        if model in self._ensembles:
            spec, wiring = self._ensembles[model]
            spec.validate_inputs({k: _probe(v) if hasattr(v, "dim") else v for k, v in inputs.items()})
            tensors: dict[str, Any] = dict(inputs)
            for step, step_inputs, _ in wiring:
                tensors.update(self._run_step(step, {k: tensors[k] for k in step_inputs}))
            result = tensors
        elif model in self.manifest.components:
            result = self._run_step(model, inputs)
        else:
            raise ModelNotFoundError(f"no model {model!r} in {self.manifest.root}")
        wanted = outputs or [k for k in result if k not in inputs]
        return {k: result[k] for k in wanted}

    def _run_step(self, model: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """One component: on its device where its engine has one (torch tensors out), else through numpy."""
        import torch

        engine = self.engine(model)
        if not hasattr(engine, "run_device"):
            return engine.run({k: to_numpy(v) for k, v in inputs.items()})
        device = torch.device(getattr(engine, "device", None) or self._device)
        moved = {}
        for tensor in engine.spec.inputs:
            value = inputs.get(tensor.name)
            if value is not None:
                if not hasattr(value, "to"):
                    value = torch.from_numpy(np.ascontiguousarray(value))
                moved[tensor.name] = value.to(device, getattr(torch, tensor.dtype) if value.is_floating_point()
                                              else value.dtype)
        engine.check({k: _probe(v) for k, v in moved.items()})  # shapes, dtypes and the budget, no copy
        out = engine.run_device(moved)  # may be views of the engine's buffers: copied before the next call
        return {k: v.float() if v.dtype == torch.float16 else v.clone() for k, v in out.items()}

    def close(self) -> None:
        for child in self._children.values():
            child.close()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


def _probe(tensor: Any) -> np.ndarray:
    """A zero-strided numpy stand-in of a torch tensor's shape and dtype, for spec validation."""
    dtype = np.dtype(str(tensor.dtype).removeprefix("torch."))
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), tuple(tensor.shape), (0,) * tensor.dim())


class TritonRunner(FamilyRoutingRunner):
    """Calls models on a Triton server: ``grpc://host:port`` or ``http://host:port``.

    With ``shared_memory=True`` numeric tensors travel through Triton *system* shared memory instead
    of the request and response bodies: one region per (model, tensor, byte size), created and
    registered with the server on first use and reused by every later call of that size. Outputs
    go through shared memory once their size is known (from the first call with the same input
    shapes). The server must run on this machine and allow the shared-memory API: a ``ti2i serve``
    server restricts it to holders of its key, ``api_key`` (default ``$TI2I_API_KEY``), sent as
    the ``ti2i-api-key`` header. A runner is for one thread at a time (its regions are reused
    across calls).

    `url` may name several replicas (a list, or URLs separated by commas): calls are spread over them
    by `ti2i.client.balancer`. A server serving several model families (`ti2i.families`) is reached
    per method through `for_method`, or with one family fixed by `family=`.
    """

    def __init__(self, url: str | Sequence[str], timeout_s: float = 600.0, shared_memory: bool = False,
                 family: str | None = None, api_key: str | None = None):
        from ti2i.client.balancer import replica_urls

        urls = replica_urls(url)
        url = ", ".join(urls)
        self.url = url
        self.protocol, self.address = _parse_url(urls[0])
        if any(_parse_url(u)[0] != self.protocol for u in urls):
            raise InvalidInputError(f"replicas {url} mix protocols: use grpc:// or http:// for all of them")
        api_key = api_key or os.environ.get("TI2I_API_KEY")
        # the restricted APIs' key, as `ti2i serve` expects it over HTTP and over gRPC
        self._key_headers = {"ti2i-api-key": api_key, "triton-grpc-protocol-ti2i-api-key": api_key} if api_key else {}
        if self.protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module
        self._module = client_module
        self._timeout_s = timeout_s
        try:
            if len(urls) > 1:
                from ti2i.client.balancer import BalancedClient

                if shared_memory:
                    raise InvalidInputError("shared memory needs one server on this machine, not several replicas")
                self.client = BalancedClient(urls, lambda u: _client(client_module, _parse_url(u)[1], timeout_s))
            else:
                self.client = _client(client_module, self.address, timeout_s)
            ready = self.client.is_server_ready()
        except InvalidInputError:
            raise
        except Exception as err:  # connection refused, DNS, ...: the client raises many types
            raise ServerUnavailableError(f"Triton server at {url} is unreachable: {err}") from None
        if not ready:
            raise ServerUnavailableError(f"Triton server at {url} is not ready")
        self._configs: dict[str, dict[str, Any]] = {}
        self.family = family
        self.families = self._families()
        if family is not None or list(self.families) == [None]:
            self.pipeline = choose_family(self.families, (), family).pipeline
        self._shm = _SharedMemoryPool(self.client, self._key_headers) if shared_memory else None
        # (model, input shapes, outputs) -> each output's (shape, numpy dtype): sizes output regions
        self._output_shapes: dict[tuple, dict[str, tuple[tuple[int, ...], np.dtype]]] = {}

    @property
    def shared_memory(self) -> bool:
        return self._shm is not None

    def model_config(self, model: str) -> dict[str, Any]:
        """The served model's configuration (as JSON), fetched once per model."""
        return self._config(model)

    def _config(self, model: str) -> dict[str, Any]:
        if model not in self._configs:
            try:
                if self.protocol == "grpc":
                    config = self.client.get_model_config(model, as_json=True)["config"]
                else:
                    config = self.client.get_model_config(model)
            except self._exception_type() as err:
                raise ModelNotFoundError(f"the server has no ready model {model!r}: {err.message()}") from None
            self._configs[model] = config
        return self._configs[model]

    def _exception_type(self) -> type[Exception]:
        from tritonclient.utils import InferenceServerException

        return InferenceServerException

    def _repository_index(self) -> list[dict[str, Any]]:
        """The repository index; where that API is restricted and this runner has no key, the
        models the methods call (those the server has)."""
        try:
            if self.protocol == "grpc":
                return self.client.get_model_repository_index(headers=self._key_headers,
                                                              as_json=True).get("models", [])
            return self.client.get_model_repository_index(headers=self._key_headers)
        except self._exception_type():
            from ti2i.client.methods import METHOD_MODELS

            names = dict.fromkeys(served_name(family, m) for family in dict.fromkeys([None, self.family])
                                  for models in METHOD_MODELS.values() for m in models)
            names.update(dict.fromkeys(self._directory()))
            return [{"name": n, "state": "READY"} for n in names if self._is_model_ready(n)]

    def _directory(self) -> list[str]:
        """The served models a multi-family server lists in its open `families` model (none elsewhere)."""
        from ti2i.triton_models.directory import DIRECTORY_MODEL, listing

        if not self._is_model_ready(DIRECTORY_MODEL):
            return []
        return [name for models in listing(self._config(DIRECTORY_MODEL)).values() for name in models]

    def _is_model_ready(self, model: str) -> bool:
        try:
            return bool(self.client.is_model_ready(model))
        except self._exception_type():
            return False

    def _families(self) -> dict[str | None, Family]:
        """The model families served, from the pipeline facts (and family name) every model's config carries."""
        ready = [e["name"] for e in self._repository_index() if e.get("state") == "READY"]
        families = families_from_configs({name: self._config(name) for name in ready})
        if not families:
            hint = ("" if self._key_headers else "; its model index is restricted to the server's key: pass "
                    "api_key= / set TI2I_API_KEY, or name the family (family= / --family)")
            raise ModelNotFoundError("the server's models carry no ti2i pipeline facts (was the repository "
                                     f"generated by `ti2i repository`/`ti2i serve`?){hint}")
        return families

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        config = self._config(model)
        batched = int(config.get("max_batch_size", 0)) > 0
        infer_inputs = []
        declared = {i["name"]: i for i in config.get("input", [])}
        inputs = _adapter_defaults(declared, inputs)
        for name, value in inputs.items():
            if name not in declared:
                raise InvalidInputError(f"{model}: unknown input {name!r} (expects {sorted(declared)})")
            value = np.asarray(value)
            if declared[name].get("data_type") == "TYPE_FP16" and value.dtype == np.float32:
                value = value.astype(np.float16)  # a native fp16 network: the runner casts at the boundary
            if batched and value.ndim == 1 and _dims(declared[name]) == [1]:
                value = value.reshape(-1, 1)  # a per-sample scalar travels as [B, 1]
            infer_input = self._module.InferInput(name, list(value.shape), _wire_dtype(value))
            if self._shm is not None and value.dtype.kind not in "OSU" and value.nbytes:
                region = self._shm.write(("in", model, name), value)
                infer_input.set_shared_memory(region, value.nbytes)
            else:
                infer_input.set_data_from_numpy(value)
            infer_inputs.append(infer_input)
        declared_outputs = {o["name"]: o for o in config.get("output", [])}
        wanted = list(outputs or declared_outputs)
        requested = [self._module.InferRequestedOutput(name) for name in wanted]
        shape_key = (model, tuple((i.name(), tuple(i.shape())) for i in infer_inputs), tuple(wanted))
        in_shm: dict[str, tuple[Any, tuple[int, ...], np.dtype]] = {}
        if self._shm is not None and shape_key in self._output_shapes:
            for name, req in zip(wanted, requested):
                shape, dtype = self._output_shapes[shape_key][name]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if dtype.kind not in "OSU" and nbytes:
                    region, handle = self._shm.region(("out", model, name), nbytes)
                    req.set_shared_memory(region, nbytes)
                    in_shm[name] = (handle, shape, dtype)
        kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}

        def infer() -> Any:  # the deadline also travels as the request's queue timeout (µs): the server drops
            # it unrun once this runner has given up on it
            return self.client.infer(model, infer_inputs, outputs=requested, timeout=int(self._timeout_s * 1e6),
                                     **kwargs)

        try:
            try:
                result = infer()
            except self._exception_type() as err:
                if _dead_stub(err) and self._ready_again(model):
                    result = infer()  # a component call is a pure function: once more, on the reloaded stub
                elif self._shm is None or not _lost_regions(err):
                    raise
                else:
                    self._shm.register_again()  # a restarted server knows none of them: once more, then the call
                    result = infer()
        except self._exception_type() as err:
            raise self._server_gone(model) or _translate(err, model) from None
        except TimeoutError:  # HTTP: the socket's deadline (gRPC reports DEADLINE_EXCEEDED above)
            raise ServerUnavailableError(f"{model}: no reply within the runner's {self._timeout_s:g} s deadline") \
                from None
        except (OSError, HTTPException) as err:  # HTTP: connection refused/reset/closed mid-request
            raise self._server_gone(model, err) or ServerUnavailableError(f"{model}: {err}") from None
        out = {}
        seen: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for name in wanted:
            if name in in_shm:
                handle, _, dtype = in_shm[name]
                value = self._shm.read(handle, _output_shape(result, name), dtype)
            else:
                value = result.as_numpy(name)
                seen[name] = (tuple(value.shape), value.dtype)
            if batched and _is_batched_scalar(declared_outputs[name]):
                value = value.reshape(-1)
            out[name] = value.astype(np.float32) if value.dtype == np.float16 else value
        if self._shm is not None and seen:
            self._output_shapes.setdefault(shape_key, {}).update(seen)
        return out

    def _ready_again(self, model: str) -> bool:
        """Whether `model` is ready again within `STUB_RELOAD_WAIT_S`."""
        deadline = time.monotonic() + STUB_RELOAD_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                if self.client.is_model_ready(model):
                    return True
            except Exception:  # the server itself is gone: not a stub's death, fail now (a balancer moves on)
                return False
        return False

    def _server_gone(self, model: str, err: Exception | None = None) -> ServerUnavailableError | None:
        """The error to raise when a failed call is due to the server stopping or being gone
        (a server shutting down first unloads its models: "unknown model"); None when it is ready."""
        if err is None and self._server_state("ready"):
            return None
        if self._server_state("live"):
            return ServerUnavailableError(f"{model}: the Triton server at {self.url} is not ready "
                                          "(it is stopping, or reloading a model)")
        cause = f" ({type(err).__name__})" if err is not None else ""
        return ServerUnavailableError(f"{model}: the Triton server at {self.url} stopped or is unreachable{cause}")

    def _server_state(self, state: str) -> bool:
        try:
            return bool(self.client.is_server_ready() if state == "ready" else self.client.is_server_live())
        except Exception:  # unreachable: refused, reset, closed
            return False

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self.client.close()


class _SharedMemoryPool:
    """System shared-memory regions of one runner, registered with the server and reused by size."""

    _ids = itertools.count()

    def __init__(self, client: Any, headers: dict[str, str] | None = None):
        from tritonclient.utils import shared_memory

        self._lib = shared_memory
        self._client = client
        self._headers = headers or {}
        # not the `ti2i_PID_N_` of a TritonServer started by this process, whose stop deletes its regions
        self._prefix = f"ti2i_client_{os.getpid()}_{next(self._ids)}"
        self._regions: dict[tuple, tuple[str, Any]] = {}

    def region(self, key: tuple, nbytes: int) -> tuple[str, Any]:
        """(registered name, handle) of the region for `key` (direction, model, tensor) of `nbytes` bytes."""
        key = (*key, nbytes)
        if key not in self._regions:
            name = f"{self._prefix}_{len(self._regions)}"
            handle = self._lib.create_shared_memory_region(name, "/" + name, nbytes, create_only=True)
            try:
                self._register(name, nbytes)
            except ServerUnavailableError:
                self._lib.destroy_shared_memory_region(handle)
                raise
            self._regions[key] = (name, handle)
        return self._regions[key]

    def _register(self, name: str, nbytes: int) -> None:
        try:
            self._client.register_system_shared_memory(name, "/" + name, nbytes, headers=self._headers)
        except Exception as err:
            message = _message(err)
            try:
                live = bool(self._client.is_server_live())
            except Exception:  # refused, reset, closed
                live = False
            if not live:
                raise ServerUnavailableError(f"the Triton server is unreachable (stopped or restarting): "
                                             f"{message}") from None
            raise ServerUnavailableError(f"the server refused system shared memory ({message}); it must run "
                                         f"on this machine and allow the shared-memory API, or be given its key "
                                         f"(api_key=..., $TI2I_API_KEY)") from None

    def register_again(self) -> None:
        """Register every region with the server once more (a restarted server has none of them)."""
        for (*_, nbytes), (name, _) in self._regions.items():
            with contextlib.suppress(Exception):  # any it still has go first
                self._client.unregister_system_shared_memory(name, headers=self._headers)
            self._register(name, nbytes)

    def write(self, key: tuple, value: np.ndarray) -> str:
        name, handle = self.region(key, value.nbytes)
        self._lib.set_shared_memory_region(handle, [value])
        return name

    def read(self, handle: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A copy of the region's contents (the region is overwritten by the next call)."""
        return np.array(self._lib.get_contents_as_numpy(handle, dtype, shape), copy=True)

    def close(self) -> None:
        for name, handle in self._regions.values():
            try:
                self._client.unregister_system_shared_memory(name, headers=self._headers)
            except Exception:  # the server may be gone already: the local region still goes
                pass
            self._lib.destroy_shared_memory_region(handle)
        self._regions.clear()


def _message(err: Exception) -> str:
    """The server's words in a tritonclient error (its message), else the exception's text."""
    return str(err.message()) if hasattr(err, "message") else str(err)


def _dead_stub(err: Exception) -> bool:
    """Whether the call failed because the python-backend stub serving it (or its family's engine core) died:
    the supervisor reloads the model, and the same call then succeeds."""
    message = _message(err)
    return "is not healthy" in message or "engine core is unavailable (restarting?)" in message


def _lost_regions(err: Exception) -> bool:
    """Whether the server said it has no such shared-memory region (it restarted since they were registered)."""
    return "Unable to find shared memory region" in _message(err)


def _client(module: Any, address: str, timeout_s: float) -> Any:
    if module.__name__.endswith("grpc"):
        return module.InferenceServerClient(address, channel_args=grpc_channel_args(module, address))
    return module.InferenceServerClient(address, network_timeout=timeout_s, connection_timeout=10.0)


# How long a component call whose stub died waits for its model to be reloaded (a supervised server reloads it in
# a second or two) before it is tried once more.
STUB_RELOAD_WAIT_S = 20.0

# gRPC waits longer after each failed connection attempt, up to 120 s: a channel kept while a server was down
# then went on failing for seconds after it was ready (3.7 s once here). At most this long:
GRPC_MAX_RECONNECT_BACKOFF_MS = 1000


def grpc_channel_args(module: Any, address: str) -> list[tuple[str, Any]]:
    """tritonclient's own channel arguments (no message size limit, its keepalive), which passing any replaces,
    then ours: the reconnect backoff's bound, and for a target naming several servers (a headless Service's
    DNS name, a static list) round robin over them, per call."""
    keepalive = module.KeepAliveOptions()
    args: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", module.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", min(200, GRPC_MAX_RECONNECT_BACKOFF_MS)),
        ("grpc.max_reconnect_backoff_ms", GRPC_MAX_RECONNECT_BACKOFF_MS),
    ]
    if address.startswith(("dns:", "ipv4:", "ipv6:")):
        args.append(("grpc.lb_policy_name", "round_robin"))
    return args


def _parse_url(url: str) -> tuple[str, str]:
    for scheme in ("grpc", "http"):
        prefix = f"{scheme}://"
        if url.startswith(prefix) and len(url) > len(prefix):
            return scheme, url[len(prefix):].rstrip("/")
    raise InvalidInputError(f"server URL {url!r} must look like grpc://HOST:PORT or http://HOST:PORT")


def _output_shape(result: Any, name: str) -> tuple[int, ...]:
    """An output's shape as the response reports it (gRPC: a protobuf message, HTTP: a dict)."""
    meta = result.get_output(name)
    return tuple(int(d) for d in (meta["shape"] if isinstance(meta, dict) else meta.shape))


def _dims(tensor_config: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor_config.get("dims", [])]


def _is_batched_scalar(tensor_config: Mapping[str, Any]) -> bool:
    """A per-sample scalar declared with dims [1] and reshaped to [] comes back as [B]."""
    reshape = tensor_config.get("reshape")
    return _dims(tensor_config) == [1] and reshape is not None and not reshape.get("shape")


def _adapter_defaults(declared: Mapping[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """A native network requires its adapter inputs (its python twin fills them): "no adapter" where not sent."""
    wanted = declared.get(LORA_DOWN)
    if wanted is None or wanted.get("optional") or LORA_DOWN in inputs or not inputs:
        return inputs
    rows = len(next(iter(inputs.values())))
    down = np.zeros((rows, _dims(wanted)[-2], 1), np.float32)
    up = np.zeros((rows, 1, _dims(declared[LORA_UP])[-1]), np.float32)
    return {**inputs, LORA_DOWN: down, LORA_UP: up}


def _wire_dtype(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return "BYTES" if value.dtype.kind in "OSU" else np_to_triton_dtype(value.dtype)


def _translate(err: Exception, model: str) -> Exception:
    status = str(err.status() or "")
    message = _message(err)
    if not status:  # a gRPC stream's error has no code: the server's message names its type (`Type: text`)
        kind = named_error(message)
        status = "INVALID_ARG" if kind is not None and issubclass(kind, InvalidInputError) else ""
    if "INVALID_ARG" in status or status == "400":
        return InvalidInputError(f"{model}: {message}")
    if "UNAVAILABLE" in status or "DEADLINE" in status:
        return ServerUnavailableError(f"{model}: {message}")
    return ServerUnavailableError(f"{model}: server error {status}: {message}")
