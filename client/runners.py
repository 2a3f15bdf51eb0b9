"""Runners: run a model (a component or an ensemble) by name, named numpy arrays in and out.

The methods only ever talk to a runner. `InProcessRunner` calls the engines of an engine directory
directly (ensembles as the same chain of calls the server makes); `TritonRunner` sends the same
calls to a Triton server over gRPC or HTTP. Both expose the pipeline facts from the manifest.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.engines.base import Engine
from ti2i.engines.ensembles import available_ensembles
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError
from ti2i.manifest import PIPELINE_PARAMETER, Manifest



class Runner(ABC):
    pipeline: dict[str, Any]

    @abstractmethod
    def run(self, model: str, /, outputs: Sequence[str] | None = None, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run `model` on named inputs; return the named outputs (all of them unless `outputs` says)."""

    def close(self) -> None:
        pass

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    """Calls models on a Triton server: ``grpc://host:port`` or ``http://host:port``."""

    def __init__(self, url: str, timeout_s: float = 600.0):
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
            infer_input.set_data_from_numpy(value)
            infer_inputs.append(infer_input)
        declared_outputs = {o["name"]: o for o in config.get("output", [])}
        wanted = list(outputs or declared_outputs)
        requested = [self._module.InferRequestedOutput(name) for name in wanted]
        try:
            kwargs = {"client_timeout": self._timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(model, infer_inputs, outputs=requested, **kwargs)
        except self._exception_type() as err:
            raise _translate(err, model) from None
        out = {}
        for name in wanted:
            value = result.as_numpy(name)
            if batched and _is_batched_scalar(declared_outputs[name]):
                value = value.reshape(-1)
            out[name] = value
        return out

    def close(self) -> None:
        self.client.close()


def _parse_url(url: str) -> tuple[str, str]:
    for scheme in ("grpc", "http"):
        prefix = f"{scheme}://"
        if url.startswith(prefix) and len(url) > len(prefix):
            return scheme, url[len(prefix):].rstrip("/")
    raise InvalidInputError(f"server URL {url!r} must look like grpc://HOST:PORT or http://HOST:PORT")


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
