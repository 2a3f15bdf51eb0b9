"""The entry-point models of a family: each method model, its `_stream` twin and each component model.

They hold no engines: each request is forwarded by BLS to the family's engine core (`core_server.py`,
the convention in `core_wire.py`) and its answers sent back, so every model of a family shares one copy of
the weights and one scheduler. `execute` hands each request to a thread of its own and returns at once;
the thread waits on the core and answers through the request's `Responses`.

A method model reads and checks the request itself (`method_io.read_request`: a bad one never reaches the
core). The plain model answers with the result; the `_stream` twin (decoupled) sends a progress response
before the first step and after each (`stage`, `step` of `steps`, `elapsed` seconds), a latent preview
every `preview_every` steps when asked, then the result. A request its client cancels (a gRPC stream
cancelled or left) is cancelled in the core too: it leaves the queue or stops at its next step.
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ti2i.client.registry import get_method
from ti2i.engines.adapters import RANK_AXES
from ti2i.errors import InvalidInputError, ServerUnavailableError
from ti2i.manifest import Manifest
from ti2i.triton_models.cancel_watch import CancelWatch
from ti2i.triton_models.core_server import Responses, ThreadPerRequest, relayed_error, response
from ti2i.triton_models.core_wire import (CANCEL, COMPONENT, ERROR, METHOD, REQUEST, TOKEN_HEADER, component_tensor,
                                         envelope, read_secret)
from ti2i.triton_models.method_io import OUTPUTS, STREAM_OUTPUTS, read_request, text
from ti2i.triton_models.python_model import as_spec_rank
from ti2i.spec import as_float32

CANCEL_POLL_S = 0.02  # how often the watcher asks Triton whether the active requests were cancelled
KEEP_ANSWERS_S = 10.0  # how long the core's answers to a request are held after its last one was read


class KeptAnswers:
    """The core's answers to each request, held by Python for `KEEP_ANSWERS_S` after they were read.

    Why: Triton 2.51's python-backend stub keeps each BLS response stream in a map that another of its
    threads empties, without holding the interpreter lock, once the stream's last response was read. When
    Python had already let go of the responses, their numpy arrays were freed there, racing the threads
    running Python: the stub died (``Segmentation fault``, ``double free or corruption``) and took its
    in-flight requests with it (fixed upstream after 2.51, python_backend #390). Held here a while
    longer, the responses are freed by Python, holding the lock, when a later request comes by."""

    def __init__(self, keep_s: float = KEEP_ANSWERS_S):
        self.keep_s = keep_s
        self._kept: collections.deque[tuple[float, Any]] = collections.deque()
        self._lock = threading.Lock()

    def keep(self, answers: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self._kept.append((now + self.keep_s, answers))
            expired = []
            while self._kept and self._kept[0][0] <= now:
                expired.append(self._kept.popleft())
        del expired  # freed here, by Python, outside the lock


class CoreError(Exception):
    """The core's error for this request (its text, ``Type: message``), passed on with its code."""


class _Entry(ThreadPerRequest):
    """What both kinds share: a thread per request, the BLS round trip to the core."""

    def _setup(self, args: dict[str, Any]) -> dict[str, str]:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        self.config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.name = args.get("model_name", "")
        self.core = params["core"]
        self.secret = read_secret(Path(args["model_repository"]).parent / self.core)
        self.threads: set[threading.Thread] = set()
        self.kept = KeptAnswers()
        return params

    def _failed(self, err: Exception) -> Any:
        return relayed_error(self.pb, str(err)) if isinstance(err, CoreError) else super()._failed(err)

    def _core_responses(self, tensors: dict[str, np.ndarray], outputs: list[str]) -> Iterator[Any]:
        """The core's responses to one request: progress, then the result (all of them read, then kept)."""
        inputs = [self.pb.Tensor(name, value) for name, value in tensors.items()]
        stream = self.pb.InferenceRequest(model_name=self.core, inputs=inputs,
                                          requested_output_names=outputs).exec(decoupled=True)
        read = []
        try:
            for answer in stream:
                read.append(answer)
                yield answer
        finally:
            with contextlib.suppress(Exception):  # a caller that stopped early: the rest, to the closing flag
                read.extend(stream)
            self.kept.keep((stream, read))

    @staticmethod
    def _outputs(core_response: Any) -> dict[str, np.ndarray]:
        if core_response.has_error():
            raise CoreError(core_response.error().message())
        out = {t.name(): np.array(t.as_numpy(), copy=True) for t in core_response.output_tensors()}
        if ERROR in out:
            raise CoreError(text(out[ERROR].reshape(-1)[0], ERROR))
        return out


class MethodEntry(_Entry):
    def initialize(self, args: dict[str, Any]) -> None:
        params = self._setup(args)
        self.method = get_method(params["method"])
        self.decoupled = self.pb.using_decoupled_model_transaction_policy(self.config)
        self.cancels = CancelWatch(CANCEL_POLL_S)

    def _answer(self, request: Any, responses: Responses) -> Any:
        def get(name: str) -> np.ndarray | None:
            tensor = self.pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else tensor.as_numpy()

        call, fmt = read_request(self.method, get)
        images = {name: call.pop(name) for name in self.method.all_images if name in call}
        token = self._token(request)
        stream = self.decoupled
        wanted = self._wanted(request)
        every = get("preview_every")
        timeout_s = request.timeout() / 1e6 if hasattr(request, "timeout") else 0.0
        request_env = envelope(METHOD, self.method.name, token, self.secret, call=call, origin=self.name,
                               format=fmt, outputs=wanted,
                               stream=stream, timeout_s=timeout_s,
                               preview_every=max(int(every.reshape(-1)[0]), 0) if every is not None else 0)
        tensors = {REQUEST: np.array([request_env], dtype=object),
                   **{name: np.array([data], dtype=object) for name, data in images.items()}}
        cancelled = self.cancels.watch(request, responses.sender if self.decoupled else None,
                                       on_cancel=lambda: self._cancel_in_core(token))
        final = None
        try:
            outputs = [*wanted, *((*STREAM_OUTPUTS, ERROR) if stream else ())]
            for core_response in self._core_responses(tensors, outputs):
                out = self._outputs(core_response)
                if not out:
                    continue  # the core's closing flag
                if "stage" in out:
                    responses.send(response(self.pb, out))
                    continue
                if "pixels" in out and self.method.output == "image":
                    out["pixels"] = out["pixels"][0]
                final = response(self.pb, out)
        except CoreError:
            if cancelled.is_set() and self.decoupled:
                return None  # the client has gone: the stream closes without a result
            raise
        finally:
            self.cancels.unwatch(request)  # before the final response, which frees the request (cancel_watch.py)
        if final is None:
            raise ServerUnavailableError(f"{self.name}: the engine core answered without a result")
        return final

    def _cancel_in_core(self, token: str) -> None:
        def send() -> None:
            try:
                cancel = envelope(CANCEL, "", token, self.secret)
                for _ in self._core_responses({REQUEST: np.array([cancel], dtype=object)}, []):
                    pass
            except Exception as err:  # the core went away: its loops went with it
                self.pb.Logger.log_warn(f"{self.name}: could not cancel in the core: {err}")

        threading.Thread(target=send, daemon=True, name=f"{self.name}-cancel").start()

    @staticmethod
    def _token(request: Any) -> str:
        """The HTTP guard's name for the request (its `TOKEN_HEADER`, which it cancels by), else a fresh one."""
        try:
            token = json.loads(request.parameters() or "{}").get(TOKEN_HEADER)
        except (ValueError, AttributeError):
            token = None
        return token if isinstance(token, str) and len(token) == 32 else uuid.uuid4().hex

    def _wanted(self, request: Any) -> list[str]:
        """The result outputs the request names. One that names none, or all (as `generate` and
        `generate_stream` do), gets no raw `encoded` bytes, which would put a PNG inside a JSON string: the
        base64 text (and, but for a stream's events, the pixels)."""
        requested = set(request.requested_output_names())
        names = [n for n in OUTPUTS if n in requested]
        if not names or requested >= set(OUTPUTS):
            return ["encoded_base64"] if self.decoupled else ["encoded_base64", "pixels"]
        return names

    def finalize(self) -> None:
        super().finalize()
        if hasattr(self, "cancels"):
            self.cancels.close()


class ComponentEntry(_Entry):
    def initialize(self, args: dict[str, Any]) -> None:
        params = self._setup(args)
        self.component = params["component"]
        self.spec = Manifest.load(params["engine_dir"]).components[self.component].spec.interface()
        self.batched = int(self.config.get("max_batch_size", 0)) > 0

    def _answer(self, request: Any, responses: Responses) -> Any:
        inputs = {}
        for tensor in self.spec.inputs:
            value = self.pb.get_input_tensor_by_name(request, tensor.name)
            if value is None and tensor.name in RANK_AXES:
                continue  # no adapter: the core fills it
            if value is None:
                raise InvalidInputError(f"{self.component}: missing input {tensor.name!r}")
            inputs[tensor.name] = as_spec_rank(self.spec, tensor.name, value.as_numpy())
        wanted = list(request.requested_output_names()) or [t.name for t in self.spec.outputs]
        timeout_s = request.timeout() / 1e6 if hasattr(request, "timeout") else 0.0
        tensors = {REQUEST: np.array([envelope(COMPONENT, self.component, uuid.uuid4().hex, self.secret,
                                               outputs=wanted, timeout_s=timeout_s)], dtype=object),
                   **{component_tensor(self.component, k): v for k, v in as_float32(inputs).items()}}
        for core_response in self._core_responses(tensors, [component_tensor(self.component, n) for n in wanted]):
            out = self._outputs(core_response)
            if out:
                prefix = component_tensor(self.component, "")
                return response(self.pb, {name[len(prefix):]: value for name, value in out.items()})
        raise ServerUnavailableError(f"{self.name}: the engine core answered without a result")

