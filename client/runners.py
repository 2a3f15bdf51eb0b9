"""Runners: run a model (a component or an ensemble) by name, named numpy arrays in and out.

The methods only ever talk to a runner. `InProcessRunner` calls the engines of an engine directory
directly (ensembles as the same chain of calls the server makes); `TritonRunner` sends the same
calls to a Triton server over gRPC or HTTP. Both expose the pipeline facts from the manifest.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines.base import Engine
from ti2i.engines.ensembles import available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError
from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.runner import Runner  # noqa: F401  (re-exported: the interface lives below client/ and triton_models/)


class InProcessRunner(Runner):
    """Engines loaded from an engine directory on first use, in this process."""

    def __init__(self, engine_dir: str | Path, **engine_options: Any):
        from ti2i.engines.loader import load_engine

        self.manifest = Manifest.load(engine_dir)
        self.pipeline = self.manifest.pipeline
        self._load = lambda name: load_engine(self.manifest, name, **engine_options)
        self._engines: dict[str, Engine] = {}
        specs = {name: entry.spec for name, entry in self.manifest.components.items()}
        self._ensembles = {e.name: (e.spec(specs), e.wiring(specs)) for e in available_ensembles(specs)}

    def engine(self, name: str) -> Engine:
        if name not in self._engines:
            self._engines[name] = self._load(name)
        return self._engines[name]

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
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

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()


class TritonRunner(Runner):
    """Calls models on a Triton server: ``grpc://host:port`` or ``http://host:port``.

    With ``shared_memory=True`` numeric tensors travel through Triton *system* shared memory instead
    of the request and response bodies: one region per (model, tensor, byte size), created and
    registered with the server on first use and reused by every later call of that size. Outputs
    go through shared memory once their size is known (from the first call with the same input
    shapes). The server must run on this machine and allow the shared-memory API. A runner is for
    one thread at a time (its regions are reused across calls).
    """

    def __init__(self, url: str, timeout_s: float = 600.0, shared_memory: bool = False):
        self.protocol, self.address = _parse_url(url)
        if self.protocol == "grpc":
            import tritonclient.grpc as client_module
        else:
            import tritonclient.http as client_module
        self._module = client_module
        self._timeout_s = timeout_s
        try:
            if self.protocol == "grpc":
                self.client = client_module.InferenceServerClient(self.address)
            else:
                self.client = client_module.InferenceServerClient(self.address, network_timeout=timeout_s,
                                                                  connection_timeout=10.0)
            ready = self.client.is_server_ready()
        except Exception as err:  # connection refused, DNS, ...: the client raises many types
            raise ServerUnavailableError(f"Triton server at {url} is unreachable: {err}") from None
        if not ready:
            raise ServerUnavailableError(f"Triton server at {url} is not ready")
        self._configs: dict[str, dict[str, Any]] = {}
        self.pipeline = self._pipeline_facts()
        self._shm = _SharedMemoryPool(self.client) if shared_memory else None
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
        if self.protocol == "grpc":
            return self.client.get_model_repository_index(as_json=True).get("models", [])
        return self.client.get_model_repository_index()

    def _pipeline_facts(self) -> dict[str, Any]:
        for entry in self._repository_index():
            if entry.get("state") != "READY":
                continue
            params = self._config(entry["name"]).get("parameters", {})
            if PIPELINE_PARAMETER in params:
                return json.loads(params[PIPELINE_PARAMETER]["string_value"])
        raise ModelNotFoundError("the server's models carry no ti2i pipeline facts (was the repository "
                                 "generated by `ti2i repository`/`ti2i serve`?)")

    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        config = self._config(model)
        batched = int(config.get("max_batch_size", 0)) > 0
        infer_inputs = []
        declared = {i["name"]: i for i in config.get("input", [])}
        for name, value in inputs.items():
            if name not in declared:
                raise InvalidInputError(f"{model}: unknown input {name!r} (expects {sorted(declared)})")
            value = np.asarray(value)
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
        try:
            kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(model, infer_inputs, outputs=requested, **kwargs)
        except self._exception_type() as err:
            raise _translate(err, model) from None
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
            out[name] = value
        if self._shm is not None and seen:
            self._output_shapes.setdefault(shape_key, {}).update(seen)
        return out

    def close(self) -> None:
        if self._shm is not None:
            self._shm.close()
        self.client.close()


class _SharedMemoryPool:
    """System shared-memory regions of one runner, registered with the server and reused by size."""

    _ids = itertools.count()

    def __init__(self, client: Any):
        from tritonclient.utils import shared_memory

        self._lib = shared_memory
        self._client = client
        self._prefix = f"ti2i_{os.getpid()}_{next(self._ids)}"
        self._regions: dict[tuple, tuple[str, Any]] = {}

    def region(self, key: tuple, nbytes: int) -> tuple[str, Any]:
        """(registered name, handle) of the region for `key` (direction, model, tensor) of `nbytes` bytes."""
        key = (*key, nbytes)
        if key not in self._regions:
            name = f"{self._prefix}_{len(self._regions)}"
            handle = self._lib.create_shared_memory_region(name, "/" + name, nbytes, create_only=True)
            try:
                self._client.register_system_shared_memory(name, "/" + name, nbytes)
            except Exception as err:
                self._lib.destroy_shared_memory_region(handle)
                message = err.message() if hasattr(err, "message") else str(err)
                raise ServerUnavailableError(f"the server refused system shared memory ({message}); it must run "
                                             f"on this machine and allow the shared-memory API") from None
            self._regions[key] = (name, handle)
        return self._regions[key]

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
                self._client.unregister_system_shared_memory(name)
            except Exception:  # the server may be gone already: the local region still goes
                pass
            self._lib.destroy_shared_memory_region(handle)
        self._regions.clear()


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


def _wire_dtype(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return "BYTES" if value.dtype.kind in "OSU" else np_to_triton_dtype(value.dtype)


def _translate(err: Exception, model: str) -> Exception:
    status = str(err.status() or "")
    message = err.message() if hasattr(err, "message") else str(err)
    if "INVALID_ARG" in status or status == "400":
        return InvalidInputError(f"{model}: {message}")
    if "UNAVAILABLE" in status or "DEADLINE" in status:
        return ServerUnavailableError(f"{model}: {message}")
    return ServerUnavailableError(f"{model}: server error {status}: {message}")
