"""Keeps a :class:`~ti2i.triton_models.server.TritonServer` serving: faults heal, readiness tells the truth.

Why: with the bundled Triton 2.51, a python-backend stub that dies (``kill -9``, the kernel's
out-of-memory killer) stays dead — every later call of its model fails with ``Stub process ... is
not healthy`` — while the model's and the server's readiness keep saying READY. The supervisor
polls the server's stub processes; when one is gone it

1. writes the model's name to the server's `stub_deaths_path`, where the HTTP guard learns that the
   requests it had in flight there will never be answered (Triton 2.51 loses a request whose stub died)
   and answers them 503; and for an entry model of a ti2i family, cancels in the family's engine core
   the requests that came through it (`EngineCore.cancel_from`): their loops stop, their places free;
2. unloads the model through the repository API (restricted to the server's key): from then on
   the model's readiness, and with ``--strict-readiness`` the server's, is false;
3. loads it again (a fresh stub), then loads again any model (an ensemble) that was ready before
   and is not any more;

and logs the fault and the recovery. If tritonserver itself exits it is restarted on the same
ports (at most ``max_restarts`` times within ``restart_window_s``; the HTTP guard answers 503
meanwhile, gRPC clients get UNAVAILABLE); a dead HTTP guard is restarted too. A stub that is alive
but hung is not detected (Triton's own ``stub-timeout`` covers calls to it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ti2i.errors import ServerUnavailableError
from ti2i.triton_models.core_wire import ORPHANED, core_of, generate_body, read_secret

if TYPE_CHECKING:
    from ti2i.triton_models.server import TritonServer

__all__ = ["Supervisor", "stub_processes"]

_LOG = logging.getLogger("ti2i.supervisor")
_STUB = "triton_python_backend_stub"


def stub_processes(server_pid: int) -> dict[str, tuple[int, str]]:
    """The live python-backend stubs of a server: instance name -> (pid, model name).

    A stub's command line is ``stub <repo>/<model>/<version>/model.py <shm region> ... <instance>
    <kind>``; zombies count as dead.
    """
    found: dict[str, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            if fields[1] != str(server_pid) or fields[0] in ("Z", "X"):
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if len(args) >= 3 and Path(args[0]).name == _STUB:
            found[args[-2]] = (int(entry.name), Path(args[1]).parent.parent.name)
    return found


class Supervisor:
    """A thread watching one server. ``Supervisor(server).start()``; :meth:`stop` ends it.

    Args:
        server: a started server; it must run with ``supervise=True`` (explicit model control).
        poll_s: how often stubs and the server are checked.
        max_restarts: server restarts allowed within ``restart_window_s`` before giving up
            (:attr:`failed` then says why, and the server stays down).
        log: receives one line per fault and recovery (default: the ``ti2i.supervisor`` logger).
    """

    def __init__(self, server: "TritonServer", poll_s: float = 0.5, max_restarts: int = 5,
                 restart_window_s: float = 600.0, log: Callable[[str], None] | None = None):
        self.server = server
        self.poll_s = float(poll_s)
        self.max_restarts = int(max_restarts)
        self.restart_window_s = float(restart_window_s)
        self._log = log or _LOG.warning
        self.events: list[str] = []
        self.failed: str | None = None
        self._restarts: list[float] = []
        self._expected: dict[str, tuple[int, str]] = {}
        self._backoff: dict[str, tuple[float, float]] = {}  # model -> (next try, delay) after a failed reload
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- lifecycle

    def start(self) -> "Supervisor":
        self._snapshot()
        self._thread = threading.Thread(target=self._run, name="ti2i-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(60.0, self.server.startup_timeout_s))

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as err:  # the watcher must outlive any one failed recovery
                self._event(f"supervisor: recovery failed, will retry: {type(err).__name__}: {err}")

    def _event(self, line: str) -> None:
        line = time.strftime("%H:%M:%S ") + line
        self.events.append(line)
        self._log(line)

    def _snapshot(self) -> None:
        pid = self.server.pid
        self._expected = stub_processes(pid) if pid else {}

    # ----- one round

    def check(self) -> None:
        """Look once; heal what is broken."""
        if self.failed or self._stop.is_set():
            return
        if not self.server.is_alive():
            self._restart_server()
            return
        if not self.server.guard_alive():
            self._event("fault: the HTTP guard exited; starting it again")
            self.server._start_guard()
            self._event("recovered: the HTTP guard listens again")
        self.server.protect_shm_regions()
        current = stub_processes(self.server.pid)
        dead: dict[str, list[str]] = {}
        for instance, (pid, model) in self._expected.items():
            if current.get(instance, (None,))[0] != pid:
                dead.setdefault(model, []).append(f"{instance} (pid {pid})")
        for model, instances in dead.items():
            if self._stop.is_set() or not self.server.is_alive():
                return
            next_try, delay = self._backoff.get(model, (0.0, 1.0))
            if time.monotonic() < next_try:
                continue
            try:
                self._reload(model, instances)
                self._backoff.pop(model, None)
            except Exception:
                self._backoff[model] = (time.monotonic() + delay, min(delay * 2, 60.0))
                raise

    def _restart_server(self) -> None:
        proc = self.server._proc
        code = proc.returncode if proc is not None else None
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.restart_window_s]
        if len(self._restarts) >= self.max_restarts:
            self.failed = (f"tritonserver exited (code {code}) and was restarted {len(self._restarts)} times "
                           f"within {self.restart_window_s:.0f} s; giving up; log {self.server.log_path}")
            self._event("fault: " + self.failed)
            return
        self._restarts.append(now)
        self._event(f"fault: tritonserver exited (code {code}); restarting it "
                    f"({len(self._restarts)}/{self.max_restarts} within {self.restart_window_s:.0f} s)")
        t0 = time.monotonic()
        try:
            self.server.restart()
        except ServerUnavailableError as err:
            self._event(f"restart failed: {str(err).splitlines()[0]}")
            return
        self._snapshot()
        self._backoff.clear()
        self._event(f"recovered: tritonserver ready again (pid {self.server.pid}) after {time.monotonic() - t0:.1f} s")

    def _reload(self, model: str, instances: list[str]) -> None:
        self._event(f"fault: model {model!r}: python-backend stub {', '.join(instances)} is gone; "
                    "unloading it (not ready) and loading it again")
        t0 = time.monotonic()
        with open(self.server.stub_deaths_path, "a") as deaths:
            deaths.write(model + "\n")
        self._orphaned(model)
        before = self._ready_models()
        self._repository(f"models/{model}/unload", {"parameters": {"unload_dependents": False}})
        self._repository(f"models/{model}/load")
        after = self._ready_models()
        for other in sorted(before - after - {model}):
            self._repository(f"models/{other}/load")
        self._snapshot()
        self.server.protect_shm_regions()
        self._event(f"recovered: model {model!r} ready again after {time.monotonic() - t0:.1f} s")

    def _orphaned(self, model: str) -> None:
        """Cancel in its family's core the requests that came through `model` (none if it is no entry model)."""
        core = core_of(model)
        if core == model:
            return
        try:
            secret = read_secret(self.server.model_repository / core)
        except OSError:
            return  # not a model of a ti2i family
        body = generate_body(ORPHANED, model, "", secret)
        request = urllib.request.Request(f"http://{self.server.triton_http_url}/v2/models/{core}/generate", data=body,
                                         method="POST", headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                response.read()
        except (OSError, urllib.error.HTTPError) as err:  # the core went too: so did its loops
            self._event(f"could not cancel {model!r}'s requests in {core!r}: {err}")

    # ----- the repository API

    def _repository(self, path: str, body: dict | None = None, timeout_s: float = 600.0) -> bytes:
        url = f"http://{self.server.triton_http_url}/v2/repository/{path}"
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(url, data=data, method="POST",
                                         headers={**self.server.api_headers, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:300]
            raise ServerUnavailableError(f"POST /v2/repository/{path} failed: {err.code} {detail}") from None

    def _ready_models(self) -> set[str]:
        index = json.loads(self._repository("index", timeout_s=30))
        return {m["name"] for m in index if m.get("state") == "READY"}
