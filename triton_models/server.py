"""Launcher for the Triton Inference Server: the machine's own, else the one bundled in ``nvidia-pytriton``.

A ``tritonserver`` on ``PATH`` (a Triton installation, e.g. NVIDIA's container with
``/opt/tritonserver/bin``) runs with that installation's own backends, so that one image serves
with the Triton (and GPU backends) it ships. Without one, the ``nvidia-pytriton`` wheel's complete
Triton 2.51 (``pytriton/tritonserver/bin/tritonserver``) is used: its python backend, one
python-backend stub per Python version and the shared libraries they need
(``nvidia_pytriton.libs/``), laid out here the way Triton expects. Either way the server runs as a
child process:

* its gRPC, HTTP and metrics ports bound to ``host`` (``127.0.0.1`` by default; free ports are
  picked when none are given), ``--strict-readiness``; behind the HTTP guard Triton's own HTTP port
  stays on loopback whatever ``host`` is;
* for the bundled Triton, ``LD_LIBRARY_PATH`` starting with ``nvidia_pytriton.libs`` (and the
  running interpreter's ``libpython`` folder); ``PATH`` starting with the running interpreter's
  ``bin`` folder, so the python-backend stub runs this virtualenv's Python and a model's
  ``model.py`` can import ``ti2i``, numpy and onnxruntime;
* stdout and stderr written to a log file (never a pipe that could fill up);
* readiness awaited on ``/v2/health/ready``; a server that exits or does not become ready in
  time raises :class:`ti2i.errors.ServerUnavailableError` carrying the tail of its log;
* safe by default: the HTTP port is served by :mod:`ti2i.triton_models.http_guard` (Triton's own
  HTTP port sits behind it), which refuses the request bodies that crash this Triton; the
  shared-memory, model-repository, logging, trace and statistics APIs are restricted over HTTP and
  gRPC to holders of :attr:`TritonServer.api_key` (sent as the ``ti2i-api-key`` header); the
  server runs with umask 077 and its python backend's ``/dev/shm`` regions are made readable by
  this user only (:meth:`TritonServer.protect_shm_regions`); ``supervise=True`` adds a :class:`ti2i.triton_models.supervisor.Supervisor` that
  reloads a model whose python-backend stub died and restarts a server that died.

Example::

    with TritonServer(Path("model_repository")) as server:
        client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Sequence

from ti2i.errors import ModelNotFoundError, ServerUnavailableError
from ti2i.triton_models.core_wire import TOKEN_HEADER

__all__ = [
    "API_KEY_ENV",
    "API_KEY_HEADER",
    "RESTRICTED_APIS",
    "ServerPorts",
    "TritonServer",
    "backend_dir_for",
    "bundled_tritonserver",
    "find_free_ports",
    "find_tritonserver",
    "is_bundled",
    "prepare_backend_dir",
    "serve_forever",
]

HOST = "127.0.0.1"
_LOG_TAIL_BYTES = 3000
# Error lines every CPU-only start logs; left out of error summaries.
_HARMLESS = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")
_PORT_RETRIES = 3  # starts: again with fresh ports when auto-picked ones were taken meanwhile, or after the
# python backend's intermittent abort while its stubs start (`_startup_abort_in_log`)
# The APIs only holders of the server's key may call (Triton's restricted-API groups): registering
# system shared memory lets a client map any region the server can open, the repository API loads
# and unloads models, logging/trace settings change what the server writes, statistics are not
# every client's business. Health, metadata, model configuration and inference stay open.
RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace", "statistics")
API_KEY_HEADER = "ti2i-api-key"
API_KEY_ENV = "TI2I_API_KEY"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
_UMASK = 0o077  # the files the server creates are its user's only


# --------------------------------------------------------------------------- locating the wheel


def _pytriton_dir() -> Path:
    """The installed ``pytriton`` package folder, found without importing it (importing is slow)."""
    try:
        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            "nvidia-pytriton is not installed: it provides the bundled tritonserver "
            "(pip install 'nvidia-pytriton==0.7.0')"
        )
    return Path(locations[0])


def _libs_dir() -> Path:
    """The wheel's shared-library folder (``nvidia_pytriton.libs`` beside ``pytriton``)."""
    pkg = _pytriton_dir()
    for candidate in (pkg.parent / "nvidia_pytriton.libs", pkg / "tritonserver" / "external_libs"):
        if candidate.is_dir():
            return candidate
    raise ModelNotFoundError(
        f"nvidia-pytriton's shared libraries were not found next to {pkg} "
        "(expected a nvidia_pytriton.libs folder); reinstall nvidia-pytriton"
    )


def find_tritonserver() -> Path:
    """The ``tritonserver`` on ``PATH``, else the one bundled in ``nvidia-pytriton``: a machine with its
    own Triton (NVIDIA's container) serves with it and its GPU backends, one without uses the wheel's.

    Raises:
        ModelNotFoundError: no ``tritonserver`` on ``PATH`` and none bundled.
    """
    found = shutil.which("tritonserver")
    return Path(found).absolute() if found else bundled_tritonserver()


def is_bundled(binary: Path) -> bool:
    """Whether ``binary`` is the wheel's (which needs its libraries and python backend laid out)."""
    try:
        return Path(binary).resolve() == bundled_tritonserver().resolve()
    except ModelNotFoundError:
        return False


def bundled_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel.

    Raises:
        ModelNotFoundError: nvidia-pytriton is missing or its wheel has no server binary.
    """
    binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise ModelNotFoundError(
            f"nvidia-pytriton is installed but has no tritonserver binary at {binary}; "
            "reinstall nvidia-pytriton (a manylinux x86_64/aarch64 wheel)"
        )
    if not os.access(binary, os.X_OK):
        raise ModelNotFoundError(f"{binary} is not executable")
    return binary


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _default_backend_cache() -> Path:
    """``~/.cache/ti2i/triton_backends`` when writable, else a per-user temporary folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    for root in (Path(base) / "ti2i", Path(tempfile.gettempdir()) / f"ti2i-{os.getuid()}"):
        try:
            root.mkdir(parents=True, exist_ok=True)
            if os.access(root, os.W_OK | os.X_OK):
                return root / "triton_backends"
        except OSError:
            continue
    return Path(tempfile.mkdtemp(prefix="ti2i-triton-backends-"))


def _same_file_content(src: Path, dst: Path) -> bool:
    try:
        s, d = src.stat(), dst.stat()
    except OSError:
        return False
    return s.st_size == d.st_size and int(s.st_mtime) == int(d.st_mtime)


def _install_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (temp file + rename), keeping mode and mtime."""
    if _same_file_content(src, dst):
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def prepare_backend_dir(cache_dir: Path | None = None) -> Path:
    """Lay out a Triton backend directory holding the bundled python backend.

    Creates ``<dir>/python/{libtriton_python.so, triton_python_backend_utils.py,
    triton_python_backend_stub}``, the stub being the one built for the running Python version.
    Idempotent and safe to call from several processes at once (files are replaced atomically,
    and only when they differ from the wheel's).

    Args:
        cache_dir: where to create it. Default: ``~/.cache/ti2i/triton_backends/<key>`` (or a
            per-user temporary folder when the home folder is not writable), ``<key>`` naming the
            Python version and the wheel's location so several virtualenvs never clash.

    Returns:
        The folder to pass as ``--backend-directory``.

    Raises:
        ModelNotFoundError: nvidia-pytriton is missing, or has no stub for this Python version.
    """
    pkg = _pytriton_dir()
    tag = _python_tag()
    backend_src = pkg / "tritonserver" / "backends" / "python"
    stub_src = pkg / "tritonserver" / "python_backend_stubs" / tag / "triton_python_backend_stub"
    sources = {
        "libtriton_python.so": backend_src / "libtriton_python.so",
        "triton_python_backend_utils.py": backend_src / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub_src,
    }
    if not stub_src.is_file():
        stubs_dir = stub_src.parent.parent
        have = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise ModelNotFoundError(
            f"nvidia-pytriton has no python-backend stub for Python {tag} "
            f"(available: {', '.join(have) or 'none'})"
        )
    for name, src in sources.items():
        if not src.is_file():
            raise ModelNotFoundError(f"nvidia-pytriton is incomplete: {src} is missing")

    if cache_dir is None:
        key = hashlib.sha1(str(pkg.resolve()).encode()).hexdigest()[:10]
        cache_dir = _default_backend_cache() / f"py{tag}-{key}"
    root = Path(cache_dir).expanduser().resolve()
    target = root / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        _install_file(src, target / name)
    stub = target / "triton_python_backend_stub"
    stub.chmod(stub.stat().st_mode | 0o111)
    return root


def backend_dir_for(binary: Path) -> Path | None:
    """The ``--backend-directory`` for ``binary``: the bundled python backend laid out by
    :func:`prepare_backend_dir` for the wheel's binary, else the installation's own ``backends`` beside its
    ``bin`` folder (``None``: Triton's built-in default)."""
    if is_bundled(binary):
        return prepare_backend_dir()
    own = Path(binary).resolve().parent.parent / "backends"
    return own if own.is_dir() else None


# --------------------------------------------------------------------------- ports


@dataclass(frozen=True)
class ServerPorts:
    """The three ports a Triton server publishes (bound to its ``host``)."""

    grpc: int
    http: int
    metrics: int


def find_free_ports(n: int = 3) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (the OS picks them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pick_ports() -> ServerPorts:
    grpc, http, metrics = find_free_ports(3)
    return ServerPorts(grpc=grpc, http=http, metrics=metrics)


# --------------------------------------------------------------------------- the server


class _StartupAborted(ServerUnavailableError):
    """serve_forever was asked to stop while the server was still starting."""


_LIVE_SERVERS: "weakref.WeakSet[TritonServer]" = weakref.WeakSet()
_SERVER_COUNTER = itertools.count(1)


@atexit.register
def _stop_live_servers() -> None:  # pragma: no cover - exercised at interpreter exit
    for server in list(_LIVE_SERVERS):
        with contextlib.suppress(Exception):
            server.stop(timeout_s=10)


def _parent_death_signal_fn(umask: int | None = None):
    """A ``preexec_fn`` asking the kernel to SIGTERM the server when its parent dies (Linux), so a
    killed Python process does not leave a server behind, and setting ``umask``; ``None`` when
    there is nothing to do. Everything is resolved here, in the parent: the child must not import
    anything between fork and exec. PDEATHSIG fires when the *thread* that forked exits, so it is
    only asked for from the main thread."""
    prctl = None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            prctl = None
    if prctl is None and umask is None:
        return None
    sigterm = int(signal.SIGTERM)

    def _preexec() -> None:
        if umask is not None:
            os.umask(umask)
        if prctl is not None:
            prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return _preexec


def _group_has_live_members(pgid: int) -> bool:
    """Whether a process group still has a member that is not a zombie."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError, OSError):
            return False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces or parentheses
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _read_tail(path: Path, nbytes: int = _LOG_TAIL_BYTES, scan_bytes: int = 256 * 1024) -> str:
    """A readable summary of the end of a Triton log: its error lines (``E...`` glog lines and
    ``error:`` lines), then its last lines, with the padding of Triton's wide tables squeezed out."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - scan_bytes))
            data = f.read()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > scan_bytes:
        lines = lines[1:]
    squeezed = [re.sub(r"\s{2,}", " ", ln).strip() for ln in lines]
    squeezed = [ln for ln in squeezed if ln and not re.fullmatch(r"[+\-| ]+", ln)]
    errors = [
        ln
        for ln in squeezed
        if (re.match(r"E\d{4} ", ln) or ln.startswith("error:")) and not any(h in ln for h in _HARMLESS)
    ]
    tail: list[str] = []
    used = 0
    for ln in reversed(squeezed):
        used += len(ln) + 1
        if used > nbytes:
            break
        tail.append(ln)
    tail.reverse()
    parts = []
    if errors:
        parts.append("errors:\n" + "\n".join(errors[-20:]))
    parts.append(("log tail:\n" if errors else "") + "\n".join(tail))
    return "\n".join(parts)


def server_env(base: dict[str, str] | None = None, bundled: bool = True) -> dict[str, str]:
    """Environment for ``tritonserver``: for the bundled one, its libraries first on ``LD_LIBRARY_PATH``
    (an installed Triton finds its own); this interpreter's ``bin`` folder first on ``PATH`` (the stub
    runs the Python found there)."""
    env = dict(os.environ if base is None else base)
    if bundled:
        lib_dirs = [str(_libs_dir())]
        # The stub links libpython3.X.so; prefer the running interpreter's own copy when it has one.
        libdir = sysconfig.get_config_var("LIBDIR")
        soname = sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and sysconfig.get_config_var("Py_ENABLE_SHARED") and (Path(libdir) / soname).exists():
            lib_dirs.append(str(libdir))
        old_ld = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in lib_dirs]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs + old_ld)
    old_path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p]
    if sys.executable:
        bin_dir = str(Path(sys.executable).parent)
        old_path = [p for p in old_path if p != bin_dir]
        env["PATH"] = os.pathsep.join([bin_dir] + old_path)
    if sys.prefix != sys.base_prefix:  # a virtualenv: make it look activated to the stub too
        env["VIRTUAL_ENV"] = sys.prefix
    env.pop("PYTHONHOME", None)
    return env


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class TritonServer:
    """A ``tritonserver`` child process serving ``model_repository``; a context manager.

    Args:
        model_repository: folder of Triton models (``<name>/config.pbtxt``, ``<name>/1/...``).
        ports: gRPC/HTTP/metrics ports; ``None`` picks free ones (and picks again, up to three
            times, if another process grabs one before the server binds it).
        log_path: file receiving the server's stdout and stderr (truncated at each start);
            ``None`` writes to a new temporary file, kept after the server stops.
        extra_args: more ``tritonserver`` arguments, e.g.
            ``["--backend-config=python,shm-default-byte-size=67108864", "--log-verbose=1"]``.
        startup_timeout_s: how long :meth:`start` waits for ``/v2/health/ready``.
        backend_dir: backend directory; default :func:`backend_dir_for` the binary
            :func:`find_tritonserver` finds.
        exit_timeout_s: ``--exit-timeout-secs``: after SIGTERM, how long Triton waits for
            in-flight requests and open HTTP keep-alive connections before unloading its models
            (Triton's default, 30 s, makes every stop with a connected HTTP client take 30 s).
            Ignored when ``extra_args`` sets it.
        api_key: the key of the restricted APIs; default ``$TI2I_API_KEY``, else a fresh random
            one. Read it back from :attr:`api_key`; clients send it as the ``ti2i-api-key`` header.
        restricted_apis: Triton API groups only key holders may call (``()`` opens them all).
        http_guard: serve the HTTP port through :mod:`ti2i.triton_models.http_guard` (refusing
            bodies over ``max_http_body_bytes`` and the form-encoded bodies that crash Triton 2.51).
        max_http_body_bytes: the guard's request-body limit.
        supervise: watch the python-backend stubs and the server; reload a model whose stub died
            and restart a server that died (:class:`ti2i.triton_models.supervisor.Supervisor`).
            Implies ``--model-control-mode=explicit`` with every model loaded at start (the
            repository API stays restricted to the key).
        host: the address the published ports (gRPC, metrics, and HTTP: the guard's) bind to, e.g.
            ``0.0.0.0`` in a container; Triton's own HTTP port behind the guard stays on loopback.
        openai_api_key: the bearer key the OpenAI-compatible API (``/v1`` on the guard's port,
            :mod:`ti2i.triton_models.openai_api`) asks of every request; default ``$TI2I_OPENAI_API_KEY``,
            else none (open, as inference is).

    Each server gets its own python-backend shared-memory prefix
    (``--backend-config=python,shm-region-prefix-name=...``, unless ``extra_args`` sets one) so that
    :meth:`stop` can delete the ``/dev/shm`` regions a killed server leaves behind.
    """

    def __init__(
        self,
        model_repository: Path,
        ports: ServerPorts | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
        backend_dir: Path | None = None,
        exit_timeout_s: int = 5,
        api_key: str | None = None,
        restricted_apis: Sequence[str] = RESTRICTED_APIS,
        http_guard: bool = True,
        max_http_body_bytes: int | None = None,
        supervise: bool = False,
        host: str = HOST,
        openai_api_key: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).expanduser().resolve()
        self._fixed_ports = ports
        self._ports: ServerPorts | None = ports
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="ti2i-tritonserver-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self._log_path = Path(log_path).expanduser().resolve()
        self.extra_args = [str(a) for a in extra_args]
        self.startup_timeout_s = float(startup_timeout_s)
        self._backend_dir = backend_dir
        self.exit_timeout_s = int(exit_timeout_s)
        self._shm_prefix = self._user_shm_prefix() or f"ti2i_{os.getpid()}_{next(_SERVER_COUNTER)}_"
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()
        self._abort: threading.Event | None = None  # set by serve_forever on SIGINT/SIGTERM
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or secrets.token_urlsafe(24)
        self.restricted_apis = tuple(restricted_apis)
        self.http_guard = bool(http_guard)
        from ti2i.triton_models.http_guard import DEFAULT_MAX_BODY_BYTES

        self.max_http_body_bytes = int(max_http_body_bytes or DEFAULT_MAX_BODY_BYTES)
        self.supervise = bool(supervise)
        from ti2i.triton_models.http_guard import OPENAI_KEY_ENV

        self.openai_api_key = openai_api_key or os.environ.get(OPENAI_KEY_ENV) or None
        self.supervisor = None  # the Supervisor while supervise=True and started
        self._triton_http: int | None = None  # Triton's own HTTP port (behind the guard)
        self._triton_metrics: int | None = None  # Triton's own metrics port (behind the guard too)
        self._guard: subprocess.Popen | None = None
        self.host = host
        self.binary: Path | None = None  # the tritonserver started (found at start)

    # ----- properties

    @property
    def ports(self) -> ServerPorts:
        if self._ports is None:
            raise ServerUnavailableError("the server has not been started: its ports are not chosen yet")
        return self._ports

    @property
    def _connect_host(self) -> str:
        """Where this machine reaches the published ports (a wildcard bind is reached on loopback)."""
        return HOST if self.host in ("0.0.0.0", "") else self.host

    @property
    def _triton_http_host(self) -> str:
        return HOST if self.http_guard else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._connect_host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"{self._connect_host}:{self.ports.http}"

    @property
    def triton_http_url(self) -> str:
        """Triton's own HTTP address: the guard's upstream (the same as :attr:`http_url` unguarded)."""
        if self.http_guard:
            return f"{HOST}:{self._triton_http or self.ports.http}"
        return self.http_url

    @property
    def api_headers(self) -> dict[str, str]:
        """The headers a client sends to call the restricted APIs: Triton's gRPC frontend expects
        the key under ``triton-grpc-protocol-<header>``; each protocol ignores the other's."""
        return {API_KEY_HEADER: self.api_key, GRPC_HEADER_PREFIX + API_KEY_HEADER: self.api_key}

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.ports.metrics}/metrics"

    @property
    def log_path(self) -> Path:
        return self._log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, nbytes: int = _LOG_TAIL_BYTES) -> str:
        return _read_tail(self._log_path, nbytes)

    def _user_shm_prefix(self) -> str | None:
        for arg in self.extra_args:
            if "shm-region-prefix-name=" in arg and "python," in arg:
                return arg.split("shm-region-prefix-name=", 1)[1].split(",")[0]
        return None

    def _has_arg(self, flag: str) -> bool:
        return any(a == flag or a.startswith(flag + "=") for a in self.extra_args)

    def command(self, ports: ServerPorts, backend_dir: Path | None) -> list[str]:
        """The full ``tritonserver`` command line."""
        http_port = self._triton_http or ports.http
        defaults = []
        if self.restricted_apis:
            apis = ",".join(self.restricted_apis)
            defaults += [f"--http-restricted-api={apis}:{API_KEY_HEADER}={self.api_key}",
                         f"--grpc-restricted-protocol={apis}:{API_KEY_HEADER}={self.api_key}"]
        if self.supervise:  # the supervisor reloads models through the (restricted) repository API
            defaults += ["--model-control-mode=explicit", "--load-model=*"]
        else:
            defaults.append("--model-control-mode=none")
        if not self._has_arg("--exit-timeout-secs"):
            defaults.append(f"--exit-timeout-secs={self.exit_timeout_s}")
        if self._user_shm_prefix() is None:
            defaults.append(f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}")
        if backend_dir is not None:
            defaults.append(f"--backend-directory={backend_dir}")
        return [
            str(self.binary or find_tritonserver()),
            f"--model-repository={self.model_repository}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--allow-grpc=true",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports.grpc}",
            "--allow-http=true",
            f"--http-address={self._triton_http_host}",
            f"--http-port={http_port}",
            "--allow-metrics=true",
            f"--metrics-address={self._triton_http_host}",
            f"--metrics-port={self._triton_metrics or ports.metrics}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--http-header-forward-pattern={TOKEN_HEADER}",  # the guard's request names (http_guard.py)
            *defaults,
            *self.extra_args,
        ]

    # ----- lifecycle

    def start(self) -> "TritonServer":
        """Start the server and wait until it reports ready.

        Raises:
            ModelNotFoundError: the model repository or the bundled server is missing.
            ServerUnavailableError: the server exited, or was not ready within
                ``startup_timeout_s`` (the message ends with the tail of its log).
        """
        with self._lock:
            if self.is_alive():
                return self
            if not self.model_repository.is_dir():
                raise ModelNotFoundError(f"model repository {self.model_repository} is not a folder")
            self.binary = find_tritonserver()
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            self.stub_deaths_path.write_bytes(b"")
            backend_dir = self._backend_directory()
            attempts = _PORT_RETRIES
            for attempt in range(1, attempts + 1):
                ports = self._fixed_ports or _pick_ports()
                if self.http_guard:
                    self._triton_http, self._triton_metrics = find_free_ports(2)
                try:
                    self._launch(ports, backend_dir)
                    self._wait_ready()
                    self.protect_shm_regions()
                    try:
                        if self.http_guard:
                            self._start_guard()
                        if self.supervise and self.supervisor is None:
                            from ti2i.triton_models.supervisor import Supervisor

                            self.supervisor = Supervisor(self).start()
                    except BaseException:
                        self.stop()
                        raise
                    return self
                except _StartupAborted:
                    raise
                except ServerUnavailableError:
                    clash = self._fixed_ports is None and self._port_clash_in_log()
                    aborted = self._startup_abort_in_log()
                    if attempt < attempts and (clash or aborted):
                        if aborted:
                            print(f"ti2i: tritonserver aborted while loading its models ({aborted}, an intermittent "
                                  f"python-backend failure); starting it again (attempt {attempt + 1} of {attempts})",
                                  file=sys.stderr, flush=True)
                        continue
                    raise
            raise AssertionError("unreachable")  # pragma: no cover

    def _backend_directory(self) -> Path | None:
        return Path(self._backend_dir) if self._backend_dir else backend_dir_for(self.binary or find_tritonserver())

    def _launch(self, ports: ServerPorts, backend_dir: Path | None) -> None:
        self._ports = ports
        cmd = self.command(ports, backend_dir)
        env = server_env(bundled=is_bundled(Path(cmd[0])))
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "wb") as log:
            log.write(("# " + " ".join(cmd) + "\n").encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.model_repository),
                # Own process group: a terminal's Ctrl-C reaches us, not the server, and stop()
                # can take down the python-backend stubs with the group.
                start_new_session=True,
                preexec_fn=_parent_death_signal_fn(umask=_UMASK),
                close_fds=True,
            )
        _LIVE_SERVERS.add(self)

    # ----- the HTTP guard

    @property
    def guard_log_path(self) -> Path:
        return self._log_path.with_name(self._log_path.name + ".guard")

    @property
    def stub_deaths_path(self) -> Path:
        """Where the supervisor writes the name of each model whose stub died, a line each: the HTTP guard
        answers the requests it had in flight there (Triton never will)."""
        return self._log_path.with_name(self._log_path.name + ".stub-deaths")

    def _start_guard(self) -> None:
        """Start the HTTP guard on the public HTTP port, forwarding to Triton's own; wait until it
        accepts connections."""
        if self._guard is not None and self._guard.poll() is None:
            return
        cmd = [sys.executable, "-m", "ti2i.triton_models.http_guard", f"--listen={self.host}:{self.ports.http}",
               f"--upstream={HOST}:{self._triton_http}", f"--max-body-bytes={self.max_http_body_bytes}",
               f"--repository={self.model_repository}", f"--openai-grpc={self._connect_host}:{self.ports.grpc}",
               f"--metrics-listen={self.host}:{self.ports.metrics}", f"--metrics-upstream={HOST}:{self._triton_metrics}",
               f"--stub-deaths={self.stub_deaths_path}"]
        from ti2i.triton_models.http_guard import OPENAI_KEY_ENV

        env = {k: v for k, v in os.environ.items() if k != OPENAI_KEY_ENV}
        if self.openai_api_key:
            env[OPENAI_KEY_ENV] = self.openai_api_key  # not in argv, which every user of the machine reads
        with open(self.guard_log_path, "ab") as log:
            self._guard = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True, close_fds=True,
                                           preexec_fn=_parent_death_signal_fn(umask=_UMASK))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._guard.poll() is not None:
                raise ServerUnavailableError(f"the HTTP guard exited with code {self._guard.returncode} "
                                             f"(port {self.ports.http} taken?); log {self.guard_log_path}")
            if all(_listening(self._connect_host, port) for port in (self.ports.http, self.ports.metrics)):
                return
            time.sleep(0.05)
        raise ServerUnavailableError(f"the HTTP guard did not listen on {self.http_url} and port {self.ports.metrics} "
                                     f"within 30 s")

    def guard_alive(self) -> bool:
        return not self.http_guard or (self._guard is not None and self._guard.poll() is None)

    def _stop_guard(self) -> None:
        guard, self._guard = self._guard, None
        if guard is None:
            return
        if guard.poll() is None:
            guard.terminate()
            try:
                guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                guard.kill()
                guard.wait()

    def restart(self) -> None:
        """Stop tritonserver (not the HTTP guard) and start it again on the same ports: clients of
        the HTTP port get 503 meanwhile, gRPC clients UNAVAILABLE."""
        with self._lock:
            self._fixed_ports = self._ports
            self._stop_triton()
            self._launch(self.ports, self._backend_directory())
            self._wait_ready()
            self.protect_shm_regions()
            if self.http_guard and not self.guard_alive():
                self._start_guard()

    def _startup_abort_in_log(self) -> str | None:
        """The python backend's intermittent abort while stubs start (Triton's python backend raises
        ``boost::interprocess::lock_exception`` from its shared-memory mutexes under load, seen here when
        dozens of stubs start at once on 2 busy cores; a fresh start succeeds): worth one more start."""
        tail = self.log_tail()
        return "boost::interprocess::lock_exception" if "boost::interprocess::lock_exception" in tail else None

    def _port_clash_in_log(self) -> bool:
        tail = self.log_tail().lower()
        # gRPC: "...Address already in use {syscall:"bind"...}";
        # HTTP/metrics: "failed to start HTTP service: Unavailable - Socket '127.0.0.1:P' already in use"
        return "already in use" in tail

    def _wait_ready(self) -> None:
        assert self._proc is not None
        url = f"http://{self.triton_http_url}/v2/health/ready"
        deadline = time.monotonic() + self.startup_timeout_s
        delay = 0.05
        while True:
            code = self._proc.poll()
            if code is not None:
                self._stop_triton()
                raise ServerUnavailableError(
                    f"tritonserver exited with code {code} before becoming ready "
                    f"(model repository {self.model_repository}); log {self._log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError:
                pass  # 400 "not ready" while models load
            except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
                pass
            if self._abort is not None and self._abort.is_set():
                self._stop_triton()
                raise _StartupAborted("server startup interrupted")
            if time.monotonic() >= deadline:
                tail = self.log_tail()
                self._stop_triton()
                raise ServerUnavailableError(
                    f"tritonserver was not ready after {self.startup_timeout_s:.0f} s "
                    f"(model repository {self.model_repository}); log {self._log_path}:\n{tail}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.2)

    def _cleanup_group(self, wait_s: float = 5.0) -> None:
        """SIGKILL whatever is left in the server's process group (python-backend stubs) and wait
        up to ``wait_s`` for it to be gone."""
        if self._proc is None:
            return
        pgid = self._proc.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, OSError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self._proc.poll()  # reap the leader once it has died
            if not _group_has_live_members(pgid):
                return
            time.sleep(0.02)

    def protect_shm_regions(self) -> int:
        """Make this server's python-backend ``/dev/shm`` regions readable by its user only; returns
        how many were changed. (The backend creates them 0644 whatever the umask: Boost.Interprocess
        sets the mode explicitly.) Called after each start; the supervisor calls it every round."""
        shm = Path("/dev/shm")
        changed = 0
        if not self._shm_prefix or not shm.is_dir():
            return 0
        for region in shm.glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                if region.stat().st_mode & 0o077:
                    region.chmod(0o600)
                    changed += 1
        return changed

    def _remove_shm_regions(self) -> None:
        """Delete ``/dev/shm`` regions left by this server's python backend (after a kill)."""
        shm = Path("/dev/shm")
        if not self._shm_prefix or not shm.is_dir():
            return
        for region in shm.glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()

    def stop(self, timeout_s: float = 30) -> None:
        """SIGTERM the server, wait up to ``timeout_s``, then SIGKILL it and its process group.

        Idempotent; also reaps a server that already died. Stops the supervisor and the guard too.
        """
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is not None:
            supervisor.stop()
        with self._lock:
            self._stop_triton(timeout_s)
            self._stop_guard()

    def _stop_triton(self, timeout_s: float = 30) -> None:
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._cleanup_group()
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait()
            self._cleanup_group()
            self._remove_shm_regions()
            self._proc = None
            _LIVE_SERVERS.discard(self)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_alive() else "stopped"
        ports = self._ports
        return f"TritonServer({str(self.model_repository)!r}, ports={ports}, {state})"


# --------------------------------------------------------------------------- CLI helper


def serve_forever(server: TritonServer, out: IO[str] | None = None) -> int:
    """Run ``server`` in the foreground, for the CLI's ``ti2i serve``.

    Starts it, prints its URLs, blocks until SIGINT/SIGTERM or until the server dies, then stops
    it. Returns 0 after a signal (also one received while the server was still starting), 1 if
    the server died on its own (its log tail goes to stderr) — with ``supervise=True``, only once
    the supervisor gave up restarting it (its faults and recoveries are logged to stderr).
    Startup failures propagate as :class:`ServerUnavailableError` / :class:`ModelNotFoundError`.
    """
    out = out or sys.stdout
    stop_requested = threading.Event()
    received: list[int] = []

    def _handler(signum: int, _frame: object) -> None:
        received.append(signum)
        stop_requested.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous: dict[int, object] = {}
    if in_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _handler)
    server._abort = stop_requested
    if server.supervise and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="ti2i serve: %(message)s")
    try:
        binary = find_tritonserver()
        source = "bundled in nvidia-pytriton" if is_bundled(binary) else "found on PATH"
        print(f"Starting {binary} ({source})...", file=out, flush=True)
        try:
            server.start()
        except _StartupAborted:
            print("Interrupted while the Triton server was starting; stopped it.", file=out, flush=True)
            return 0
        print(f"Triton server ready (pid {server.pid}, models from {server.model_repository})", file=out)
        if server.host != HOST:
            print(f"  listening on {server.host} (Triton's own HTTP port on {HOST}, behind the guard)"
                  if server.http_guard else f"  listening on {server.host}", file=out)
        print(f"  gRPC    {server.grpc_url}", file=out)
        guard = f" (guarded: bodies up to {server.max_http_body_bytes} bytes)" if server.http_guard else ""
        print(f"  HTTP    http://{server.http_url}{guard}", file=out)
        print(f"  metrics {server.metrics_url}", file=out)
        print(f"  log     {server.log_path}", file=out)
        if server.restricted_apis:
            source = "from $" + API_KEY_ENV if os.environ.get(API_KEY_ENV) == server.api_key else "generated"
            print(f"  restricted APIs ({', '.join(server.restricted_apis)}): header {API_KEY_HEADER}: "
                  f"{server.api_key} ({source})", file=out)
        if server.supervisor is not None:
            print("  supervised: dead python-backend stubs are reloaded, a dead server restarted", file=out)
        print("Press Ctrl-C to stop.", file=out, flush=True)
        while not stop_requested.wait(0.5):
            if server.supervisor is not None:
                if server.supervisor.failed:
                    print(f"ti2i serve: {server.supervisor.failed}", file=sys.stderr)
                    return 1
            elif not server.is_alive():
                code = server._proc.returncode if server._proc is not None else None
                print(
                    f"tritonserver exited unexpectedly (code {code}); log {server.log_path}:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        print(f"Stopping Triton server ({signal.Signals(received[0]).name})...", file=out, flush=True)
        return 0
    finally:
        server.stop()  # with _abort still set: a restart under way gives up at once
        server._abort = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
