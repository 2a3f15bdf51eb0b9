"""The python-backend model of a family's engine core (`core`, or ``<family>.core``): see `core.py`.

It is decoupled: a method request's progress responses (when its entry streams) go out as its loop steps,
then its result. `execute` hands each request to a thread of its own and returns at once; admission, not
Triton's queue, bounds how many run and wait (`core.Admission`). Requests follow `core_wire.py`.
"""

from __future__ import annotations

import hmac
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.client.registry import get_method
from ti2i import errors
from ti2i.errors import InvalidInputError, ServerUnavailableError, Ti2iError
from ti2i.triton_models.core import Cancelled, CoreOptions, EngineCore
from ti2i.triton_models.core_metrics import CoreMetrics
from ti2i.triton_models.core_wire import (CANCEL, COMPONENT, IMAGE_INPUTS, METHOD, REQUEST, component_tensor,
                                         read_envelope, read_secret)
from ti2i.work_limits import WorkLimits


def error_code(pb: Any, kind: type[BaseException]) -> int:
    """A client's fault is INVALID_ARG, a full server UNAVAILABLE, a cancelled request CANCELLED."""
    errors = pb.TritonError
    if issubclass(kind, ServerUnavailableError):
        return errors.UNAVAILABLE
    if issubclass(kind, Cancelled):
        return errors.CANCELLED
    return errors.INVALID_ARG if issubclass(kind, Ti2iError) else errors.INTERNAL


def error_response(pb: Any, err: Exception) -> Any:
    return pb.InferenceResponse(error=pb.TritonError(f"{type(err).__name__}: {err}", error_code(pb, type(err))))


def relayed_error(pb: Any, message: str) -> Any:
    """The core's error, relayed by an entry point with its code: a BLS response's error keeps only its message
    (`TYPE: text`, as `error_response` wrote it), so the code is found again from the type's name. An error in
    Triton's own words means the core could not be reached (its stub died and is being reloaded): UNAVAILABLE."""
    prefix = message.split(":", 1)[0]
    if prefix in ERROR_TYPES:
        kind: type[BaseException] = ERROR_TYPES[prefix]
    elif prefix.isidentifier() and prefix.endswith(("Error", "Exception")):
        kind = Exception  # the core failed on this request
    else:
        kind = ServerUnavailableError
        message = f"ServerUnavailableError: the engine core is unavailable (restarting?): {message}"
    return pb.InferenceResponse(error=pb.TritonError(message, error_code(pb, kind)))


ERROR_TYPES: dict[str, type[BaseException]] = {
    **{name: kind for name, kind in vars(errors).items() if isinstance(kind, type) and issubclass(kind, Ti2iError)},
    "Cancelled": Cancelled}


def response(pb: Any, tensors: dict[str, np.ndarray]) -> Any:
    return pb.InferenceResponse(output_tensors=[pb.Tensor(k, np.ascontiguousarray(v)) for k, v in tensors.items()])


class ThreadPerRequest:
    """What the core and its entry points share: `execute` hands each request to a thread of its own and returns
    at once; the thread answers through the request's response sender, always with a final response."""

    pb: Any
    name: str
    threads: set[threading.Thread]

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            thread = threading.Thread(target=self._answer_safely, args=(request,), daemon=True,
                                      name=f"{self.name}-request")
            self.threads.add(thread)
            thread.start()

    def _answer_safely(self, request: Any) -> None:
        sender = request.get_response_sender()
        try:
            final = self._answer(request, sender)
        except Exception as err:  # one request's failure never reaches the others or the model
            final = self._failed(err)
        finally:
            self.threads.discard(threading.current_thread())
        sender.send(final, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _answer(self, request: Any, sender: Any) -> Any:
        """The final response (None: the stream closes without one)."""
        raise NotImplementedError

    def _failed(self, err: Exception) -> Any:
        return error_response(self.pb, err)

    def finalize(self) -> None:
        for thread in list(getattr(self, "threads", ())):  # unloading: let the running requests answer
            thread.join(timeout=60)


class TritonPythonModel(ThreadPerRequest):
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = args.get("model_name", "core")
        self.secret = read_secret(Path(args["model_repository"]))
        settings = json.loads(params["options"])
        options = CoreOptions(**{**settings, "limits": WorkLimits(**settings.get("limits", {}))})
        budgets = json.loads(params["memory_budget"]) if params.get("memory_budget") else None
        self.metrics = CoreMetrics(pb_utils, self.name)
        methods = [get_method(name) for name in json.loads(params["methods"])]
        self.core = EngineCore(params["engine_dir"], methods, json.loads(params["components"]), options,
                               budgets=budgets, metrics=self.metrics)
        loaded = self.core.load()
        self.metrics.attach(self.core.admission, self.core.scheduler.executions)
        self.threads: set[threading.Thread] = set()
        pb_utils.Logger.log_info(f"{self.name}: {self.core.describe()} ({', '.join(loaded)}), "
                                 f"{options.active} active requests, a queue of {options.max_queue} "
                                 f"({options.queue_timeout_s:g} s), methods {', '.join(m.name for m in methods)}")

    def _get(self, request: Any, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _failed(self, err: Exception) -> Any:
        if isinstance(err, Cancelled):
            self.pb.Logger.log_info(f"{self.name}: {err}")
        return super()._failed(err)

    def _answer(self, request: Any, sender: Any) -> Any:
        env = read_envelope(self._get(request, REQUEST).reshape(-1)[0])
        if not hmac.compare_digest(str(env.get("secret", "")), self.secret):
            raise InvalidInputError(f"{self.name} answers its entry points only: send the request to a method or "
                                    f"component model")
        kind, name, token = env["kind"], env["name"], env["token"]
        if kind == CANCEL:
            self.core.cancel(token)
            return response(self.pb, {})
        if kind == METHOD:
            call = dict(env["call"])
            for image in IMAGE_INPUTS:
                value = self._get(request, image)
                if value is not None:
                    call[image] = value.reshape(-1)[0]
            on_step = (lambda tensors: sender.send(response(self.pb, tensors))) if env.get("stream") else None
            out = self.core.run_method(name, call, env["format"], env["outputs"], token, on_step=on_step,
                                       preview_every=int(env.get("preview_every", 0)),
                                       timeout_s=float(env.get("timeout_s", 0.0)))
            return response(self.pb, out)
        if kind == COMPONENT:
            spec = self.core.engines.spec_of(name).interface()
            inputs = {t.name: self._get(request, component_tensor(name, t.name)) for t in spec.inputs}
            out = self.core.run_component(name, {k: v for k, v in inputs.items() if v is not None},
                                          env.get("outputs") or None, float(env.get("timeout_s", 0.0)))
            return response(self.pb, {component_tensor(name, k): v for k, v in out.items()})
        raise ValueError(f"unknown core request kind {kind!r}")

    def finalize(self) -> None:
        super().finalize()
        if hasattr(self, "core"):
            self.core.close()
        if hasattr(self, "metrics"):
            self.metrics.close()
