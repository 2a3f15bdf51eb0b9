"""Client-side balancing over several Triton replicas of one deployment.

`BalancedClient` stands in for one tritonclient client inside `TritonRunner` when it is given several
URLs. Each call goes to the healthy replica with the fewest requests outstanding (ties rotate, so a
one-call-at-a-time loop alternates). A call that fails in transport (connection refused or reset, gRPC
UNAVAILABLE) triggers a health check of its replica; one that fails it is taken out of rotation and
reported once, in one line, and probed again every `recheck_s` so a restarted replica comes back.

Component and ensemble calls are pure functions of their inputs, so one that failed in transport is
retried once on another replica. A whole-method request (a model named after a method, or a
``*_stream`` model) is not retried blindly: it may have started, and its client may already have
seen partial results; the error says so.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ti2i.errors import InvalidInputError, ServerUnavailableError
from ti2i.families import split_served_name

LOG = logging.getLogger("ti2i.balancer")
HEALTH_TIMEOUT_S = 2.0


def replica_urls(url: str | Sequence[str]) -> list[str]:
    """URLs from a list or a comma-separated string (a comma inside a gRPC target such as
    ``grpc://ipv4:HOST:PORT,HOST:PORT`` stays: only a comma before a scheme separates replicas)."""
    parts = re.split(r",\s*(?=(?:grpc|http)://)", url) if isinstance(url, str) else list(url)
    urls = [u.strip() for u in parts if u.strip()]
    if not urls:
        raise InvalidInputError("no server URL given")
    if len(set(urls)) != len(urls):
        raise InvalidInputError(f"a server URL is given twice: {', '.join(urls)}")
    return urls


def is_whole_method(model: str) -> bool:
    """A model that runs a whole method server-side: not idempotent from the client's point of view."""
    from ti2i.client.methods import METHOD_MODELS
    from ti2i.client.registry import STREAM_SUFFIX

    plain = split_served_name(model)[1]
    return plain in METHOD_MODELS or plain.endswith(STREAM_SUFFIX)


def is_transport_failure(err: BaseException) -> bool:
    """The replica could not be reached or dropped the connection (not: the request was bad or failed)."""
    if isinstance(err, OSError):  # HTTP: refused, reset, broken pipe
        return True
    status = getattr(err, "status", None)
    return callable(status) and "UNAVAILABLE" in str(status() or "")


@dataclass
class Replica:
    url: str
    client: Any
    outstanding: int = 0
    completed: int = 0
    healthy: bool = True
    checked_at: float = 0.0


class BalancedClient:
    """The subset of a tritonclient client `TritonRunner` uses, spread over several replicas."""

    def __init__(self, urls: Sequence[str], connect: Callable[[str], Any], recheck_s: float = 5.0):
        self.replicas = [Replica(url, connect(url)) for url in urls]
        self.recheck_s = recheck_s
        self._lock = threading.Lock()
        self._turn = itertools.count()

    # ----- choosing a replica

    def _acquire(self, exclude: Replica | None = None) -> Replica | None:
        self._recheck_down()
        with self._lock:
            candidates = [r for r in self.replicas if r.healthy and r is not exclude]
            if not candidates:
                return None
            start = next(self._turn) % len(candidates)
            rotated = candidates[start:] + candidates[:start]
            chosen = min(rotated, key=lambda r: r.outstanding)  # min keeps the first of equals
            chosen.outstanding += 1
            return chosen

    def _release(self, replica: Replica, ok: bool) -> None:
        with self._lock:
            replica.outstanding -= 1
            replica.completed += ok

    def _recheck_down(self) -> None:
        now = time.monotonic()
        for replica in self.replicas:
            if not replica.healthy and now - replica.checked_at >= self.recheck_s:
                self._check(replica)

    def _check(self, replica: Replica) -> bool:
        """Health-check `replica`, updating (and reporting once) a change of its state."""
        try:
            ok = bool(_call(replica.client.is_server_ready, timeout=HEALTH_TIMEOUT_S))
            reason = "not ready"
        except Exception as err:  # refused, reset, timed out: all mean "down"
            ok, reason = False, _short(err)
        with self._lock:
            replica.checked_at = time.monotonic()
            changed, replica.healthy = replica.healthy != ok, ok
            left = sum(r.healthy for r in self.replicas)
        if changed and not ok:
            LOG.warning("ti2i: replica %s failed its health check (%s); %d of %d replicas left",
                        replica.url, reason, left, len(self.replicas))
        elif changed:
            LOG.warning("ti2i: replica %s is healthy again; %d of %d replicas in use", replica.url, left,
                        len(self.replicas))
        return ok

    def _none_left(self) -> ServerUnavailableError:
        return ServerUnavailableError("no healthy Triton replica: " + ", ".join(r.url for r in self.replicas))

    # ----- the calls TritonRunner makes

    def is_server_ready(self) -> bool:
        """Ready when at least one replica is (the others are reported and left out until they recover)."""
        return sum(self._check(r) for r in self.replicas) > 0

    def infer(self, model_name: str, inputs: Any, **kwargs: Any) -> Any:
        replica = self._acquire()
        if replica is None:
            raise self._none_left()
        try:
            return self._infer_on(replica, model_name, inputs, kwargs)
        except Exception as err:
            if not is_transport_failure(err):
                raise
            self._check(replica)
            if is_whole_method(model_name):
                raise _not_retried(err, replica, model_name) from None
            retry = self._acquire(exclude=replica)
            if retry is None:
                raise
            return self._infer_on(retry, model_name, inputs, kwargs)

    def _infer_on(self, replica: Replica, model_name: str, inputs: Any, kwargs: dict[str, Any]) -> Any:
        ok = False
        try:
            result = replica.client.infer(model_name, inputs, **kwargs)
            ok = True
            return result
        finally:
            self._release(replica, ok)

    def close(self) -> None:
        for replica in self.replicas:
            try:
                replica.client.close()
            except Exception:  # a dead replica's channel may fail to close: the others still close
                pass

    def __getattr__(self, name: str) -> Callable[..., Any]:
        """Metadata calls (model config, repository index, statistics, ...): any healthy replica, with failover."""
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> Any:
            tried: set[int] = set()
            while True:
                replica = next((r for r in self.replicas if r.healthy and id(r) not in tried), None)
                if replica is None:
                    raise self._none_left()
                tried.add(id(replica))
                try:
                    return getattr(replica.client, name)(*args, **kwargs)
                except Exception as err:
                    if not is_transport_failure(err) or self._check(replica):
                        raise  # the server's own answer (e.g. a restricted API), not a replica gone

        return call


def _call(method: Callable[..., Any], timeout: float) -> Any:
    """gRPC clients take a per-call timeout; HTTP clients carry theirs from construction."""
    try:
        return method(client_timeout=timeout)
    except TypeError:
        return method()


def _short(err: BaseException) -> str:
    text = err.message() if hasattr(err, "message") and callable(err.message) else str(err)
    return " ".join(str(text).split())[:160]


def _not_retried(err: BaseException, replica: Replica, model: str) -> Exception:
    message = (f"replica {replica.url} failed during {model!r} ({_short(err)}); a whole-method request is not "
               f"retried, it may have started there: send it again")
    if isinstance(err, OSError):
        return ServerUnavailableError(message)
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(message, status=err.status())
