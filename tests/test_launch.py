"""One launch path: the container's entrypoint and the Kubernetes pod both run `ti2i serve`.

The pod's own command, rendered by `ti2i kubernetes` and run here with local paths and ports on the bundled
Triton, must keep the guard's protection, serve a whole method and export the series the autoscaler reads.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from ti2i.app.cli import build_parser, cmd_serve
from ti2i.client.registry import METHODS
from ti2i.client.remote import request_tensors
from ti2i.kubernetes import LOG, REPOSITORY, KubernetesSettings, adapter_rule, container_command
from ti2i.triton_models import server as srv
from ti2i.triton_models.server import ServerPorts, TritonServer, find_free_ports

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"


def _recorder(bin_dir: Path, tool: str, out: Path) -> None:
    """A stand-in `tool` on PATH that appends its command line (one argument a line, then a blank line) to `out`."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / tool
    script.write_text(f'#!/bin/sh\n{{ echo {tool}; for a in "$@"; do echo "$a"; done; echo; }} >> {out}\n')
    script.chmod(0o755)


def _calls(out: Path) -> list[list[str]]:
    return [call.splitlines() for call in out.read_text().split("\n\n") if call.strip()]


# --------------------------------------------------------------------------- which tritonserver


def test_a_tritonserver_on_path_wins_with_its_own_backends(tmp_path, monkeypatch):
    """NVIDIA's container has /opt/tritonserver/{bin,backends}: that Triton, not the wheel's, must serve there."""
    install = tmp_path / "opt" / "tritonserver"
    (install / "bin").mkdir(parents=True)
    (install / "backends" / "python").mkdir(parents=True)
    binary = install / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{install / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert srv.find_tritonserver() == binary and not srv.is_bundled(binary)
    assert srv.backend_dir_for(binary) == install / "backends"
    server = TritonServer(tmp_path, log_path=tmp_path / "log")
    command = server.command(ServerPorts(1, 2, 3), srv.backend_dir_for(binary))
    assert command[0] == str(binary) and f"--backend-directory={install / 'backends'}" in command
    bundled_libs = str(srv._libs_dir())
    assert bundled_libs not in srv.server_env(bundled=False).get("LD_LIBRARY_PATH", "")


def test_without_one_on_path_the_bundled_tritonserver_serves(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # this virtualenv's bin: no tritonserver
    assert srv.find_tritonserver() == srv.bundled_tritonserver()
    assert srv.is_bundled(srv.find_tritonserver())
    assert srv.backend_dir_for(srv.find_tritonserver()) == srv.prepare_backend_dir()


@pytest.mark.parametrize("guard", [True, False])
def test_host_binds_the_published_ports_and_keeps_triton_http_behind_the_guard(tmp_path, guard):
    """Guarded, Triton's own HTTP and metrics ports stay on loopback (the guard publishes both)."""
    server = TritonServer(tmp_path, log_path=tmp_path / "log", host="0.0.0.0", http_guard=guard,
                          ports=ServerPorts(grpc=8001, http=8000, metrics=8002))
    command = server.command(server.ports, None)
    assert "--grpc-address=0.0.0.0" in command
    own = "127.0.0.1" if guard else "0.0.0.0"
    assert {f"--http-address={own}", f"--metrics-address={own}"} <= set(command)
    # this machine reaches a wildcard bind on loopback
    assert (server.grpc_url, server.http_url) == ("127.0.0.1:8001", "127.0.0.1:8000")
    assert server.metrics_url == "http://127.0.0.1:8002/metrics"


# --------------------------------------------------------------------------- the container's entrypoint


@pytest.mark.parametrize("backend, builds", [("tensorrt", True), ("ort", False)])
def test_the_entrypoint_builds_then_execs_ti2i_serve(tmp_path, backend, builds):
    out = tmp_path / "calls"
    _recorder(tmp_path / "bin", "ti2i", out)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
           "TI2I_ENGINES": "sd15=/engines/sd15 svd=/engines/svd", "TI2I_BACKEND": backend}
    subprocess.run(["sh", str(ENTRYPOINT), "--methods", "sdedit,svd"], env=env, check=True, timeout=30)
    *build_calls, serve = _calls(out)
    assert [c[:5] for c in build_calls] == ([["ti2i", "build", "--backend", "tensorrt", "--engines"]] * 2
                                            if builds else [])
    assert serve[:2] == ["ti2i", "serve"]
    args = build_parser().parse_args(serve[1:])
    assert args.func is cmd_serve and not args.no_supervise
    assert args.engines == ["sd15=/engines/sd15", "svd=/engines/svd"] and args.methods == "sdedit,svd"
    assert (args.engine_backend, args.host, args.http_port, args.grpc_port, args.metrics_port) == (
        backend, "0.0.0.0", 8000, 8001, 8002)


# --------------------------------------------------------------------------- the pod's command, run here


def _rewrite(command: str, replacements: dict[str, str]) -> str:
    """`command` with each key replaced; each must occur exactly once (a changed rendering fails here, loudly)."""
    for old, new in replacements.items():
        assert command.count(old) == 1, (old, command)
        command = command.replace(old, new)
    return command


def _get(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def _post(url: str, body: bytes, content_type: str, timeout: float = 300) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, OSError):  # the connection broke without a reply
        return 0, b""


def _sdedit_json(image: Image.Image) -> bytes:
    """An HTTP/JSON infer request for a PNG, as a curl user would write it."""
    tensors = request_tensors(METHODS["sdedit"], image=image, prompt="a watercolor of a house", steps=2,
                              strength=0.5, seed=11)
    inputs = []
    for name, value in tensors.items():
        if value.dtype == object:
            data = [base64.b64encode(v).decode() if name == "image" else v.decode() for v in value]
            inputs.append({"name": name, "shape": [1], "datatype": "BYTES", "data": data})
        else:
            datatype = {"f": "FP64", "i": "INT64", "b": "BOOL"}[value.dtype.kind]
            inputs.append({"name": name, "shape": [1], "datatype": datatype, "data": value.tolist()})
    return json.dumps({"inputs": inputs, "outputs": [{"name": "encoded_base64"}]}).encode()


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of series `name` in a Prometheus text exposition: (labels, value)."""
    found = []
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        found.append((labels, float(match.group(2))))
    return found


@pytest.mark.timeout(900)
def test_the_pod_command_serves_guarded_and_exports_the_autoscaler_series(engines, example_image, tmp_path):
    family = engines.root.name  # the pod serves /engines/<family>; here the fixture's engine directory
    grpc, http, metrics = find_free_ports(3)
    command = _rewrite(container_command(KubernetesSettings(families=(family,))), {
        f"=/engines/{family}": f"={engines.root}",
        REPOSITORY: str(tmp_path / "model_repository"),
        LOG: str(tmp_path / "tritonserver.log"),
        "--host 0.0.0.0": "--host 127.0.0.1",
        "--http-port 8000": f"--http-port {http}",
        "--grpc-port 8001": f"--grpc-port {grpc}",
        "--metrics-port 8002": f"--metrics-port {metrics}",
    })
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TI2I_API_KEY": "s3cret-launch-key"}
    base = f"http://127.0.0.1:{http}"
    model = f"{family}.sdedit"
    stdout = tmp_path / "serve.out"
    with open(stdout, "wb") as out:
        proc = subprocess.Popen(["sh", "-c", command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    logs = lambda: stdout.read_text(errors="replace")[-4000:]  # noqa: E731
    try:
        deadline = time.monotonic() + 600
        while _get(f"{base}/v2/health/ready", timeout=2)[0] != 200:
            assert proc.poll() is None, f"ti2i serve exited with {proc.returncode}:\n{logs()}"
            assert time.monotonic() < deadline, f"not ready after 600 s:\n{logs()}"
            time.sleep(0.5)
        # Triton answers ready a moment before `ti2i serve` (which polls it) prints its banner: wait for that
        banner_deadline = time.monotonic() + 60
        while "s3cret-launch-key" not in logs() and proc.poll() is None and time.monotonic() < banner_deadline:
            time.sleep(0.2)
        assert "bundled in nvidia-pytriton" in logs() and "s3cret-launch-key" in logs()

        # (a) the body that kills Triton 2.51's own HTTP frontend: refused or parsed as bad JSON, server unharmed
        status, _ = _post(f"{base}/v2/models/{model}/infer", b"\0" * 8_000_000, "application/x-www-form-urlencoded")
        assert status in (400, 500), status
        assert _get(f"{base}/v2/health/live")[0] == 200 and _get(f"{base}/v2/health/ready")[0] == 200
        assert proc.poll() is None

        # (b) a whole SDEdit over HTTP/JSON: one PNG back
        status, body = _post(f"{base}/v2/models/{model}/infer", _sdedit_json(example_image), "application/json")
        assert status == 200, body[:2000]
        (output,) = json.loads(body)["outputs"]
        png = base64.b64decode(output["data"][0])
        assert png.startswith(b"\x89PNG")
        assert Image.open(io.BytesIO(png)).size == example_image.size

        # (c) the series the autoscaler's adapter rule queries, on the published metrics port
        wanted = re.findall(r"(\w+)\{<<\.LabelMatchers>>\}", adapter_rule()["metricsQuery"])
        assert wanted == ["ti2i_queue_wait_seconds_sum", "ti2i_queue_wait_seconds_count"]
        deadline = time.monotonic() + 30  # the cores report every 0.5 s
        while True:
            text = _get(f"http://127.0.0.1:{metrics}/metrics")[1].decode(errors="replace")
            samples = {name: [labels for labels, _ in _samples(text, name) if labels.get("method") == "sdedit"]
                       for name in wanted}
            if all(samples.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert all(samples.values()), f"missing {[n for n, s in samples.items() if not s]} in:\n" + "\n".join(
            line for line in text.splitlines() if line.startswith("ti2i_"))
        assert all(labels.get("model") for found in samples.values() for labels in found)
        count = sum(v for labels, v in _samples(text, wanted[1]) if labels.get("method") == "sdedit")
        assert count >= 1

        os.killpg(proc.pid, signal.SIGTERM)  # a pod's stop: ti2i serve stops Triton and exits 0
        assert proc.wait(timeout=60) == 0, logs()
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
