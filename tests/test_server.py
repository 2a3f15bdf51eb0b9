"""The bundled Triton server starts, serves gRPC and HTTP, runs beside a second one and stops clean.

Uses a tiny python-backend echo model generated into tmp_path; no GPU needed (about 15 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from ti2i.triton_models import server as srv
from ti2i.triton_models.server import (
    ServerPorts,
    TritonServer,
    find_free_ports,
    prepare_backend_dir,
)

from ti2i.errors import ServerUnavailableError

pytestmark = pytest.mark.timeout(120)

ECHO_CONFIG = """\
name: "echo"
backend: "python"
max_batch_size: 4
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ECHO_MODEL = '''\
import numpy as np
import triton_python_backend_utils as pb_utils

import ti2i.errors  # the stub runs the project's virtualenv Python


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x * 2).astype(np.float32))]))
        return responses
'''


def _write_model(repo: Path, name: str, config: str, model_py: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(config.replace('name: "echo"', f'name: "{name}"'))
    (repo / name / "1" / "model.py").write_text(model_py)


@pytest.fixture()
def echo_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    _write_model(repo, "echo", ECHO_CONFIG, ECHO_MODEL)
    return repo


def _group_pids(pgid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
                pids.add(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _infer_grpc(server: TritonServer, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("echo", [inp]).as_numpy("y")
    finally:
        client.close()


def _infer_http(server: TritonServer, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        assert client.is_server_ready()
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("echo", [inp]).as_numpy("y")
    finally:
        client.close()  # an open keep-alive connection delays Triton's shutdown


def test_bundled_server_and_backend_dir(tmp_path: Path) -> None:
    binary = srv.find_tritonserver()
    assert binary.is_file() and os.access(binary, os.X_OK)
    first = prepare_backend_dir(tmp_path / "backends")
    again = prepare_backend_dir(tmp_path / "backends")
    assert first == again
    names = sorted(p.name for p in (first / "python").iterdir())
    assert names == ["libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"]
    assert os.access(first / "python" / "triton_python_backend_stub", os.X_OK)


def test_two_servers_serve_grpc_and_http_and_stop_clean(echo_repo: Path, tmp_path: Path) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    grpc_port, http_port, metrics_port = find_free_ports(3)
    first = TritonServer(echo_repo, log_path=tmp_path / "first.log", startup_timeout_s=60)
    second = TritonServer(
        echo_repo,
        ports=ServerPorts(grpc=grpc_port, http=http_port, metrics=metrics_port),
        log_path=tmp_path / "second.log",
        extra_args=["--backend-config=python,shm-default-byte-size=2097152"],
        startup_timeout_s=60,
    )
    with first:
        assert first.is_alive()
        assert first.grpc_url.startswith("127.0.0.1:") and first.http_url.startswith("127.0.0.1:")
        np.testing.assert_array_equal(_infer_grpc(first, x), x * 2)
        np.testing.assert_array_equal(_infer_http(first, x), x * 2)

        with second:
            assert second.ports == ServerPorts(grpc_port, http_port, metrics_port)
            used = {first.ports.grpc, first.ports.http, first.ports.metrics}
            assert used.isdisjoint({second.ports.grpc, second.ports.http, second.ports.metrics})
            np.testing.assert_array_equal(_infer_grpc(second, x[:1]), x[:1] * 2)
            np.testing.assert_array_equal(_infer_http(second, x[:1]), x[:1] * 2)
            second_pids = _group_pids(second.pid)
            assert len(second_pids) >= 2  # tritonserver + one python-backend stub
        assert not second.is_alive()
        np.testing.assert_array_equal(_infer_grpc(first, x), x * 2)  # the first one is unaffected
        first_pids = _group_pids(first.pid)
        assert len(first_pids) >= 2

    assert not first.is_alive()
    first.stop()  # idempotent
    second.stop()
    leftover = [pid for pid in first_pids | second_pids if _alive(pid)]
    assert leftover == []
    assert "Started GRPCInferenceService" in first.log_path.read_text()


def test_broken_model_raises_with_log_tail(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "echo", ECHO_CONFIG, "import no_such_module_for_ti2i_tests\n")
    server = TritonServer(repo, log_path=tmp_path / "broken.log", startup_timeout_s=60)
    with pytest.raises(ServerUnavailableError) as info:
        server.start()
    assert "no_such_module_for_ti2i_tests" in str(info.value)
    assert not server.is_alive()


def test_serve_forever_stops_on_sigint(echo_repo: Path, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from ti2i.triton_models.server import TritonServer, serve_forever
        sys.exit(serve_forever(TritonServer(Path({str(echo_repo)!r}), log_path=Path({str(tmp_path / "serve.log")!r}))))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "Press Ctrl-C" in text, text
        assert "gRPC    127.0.0.1:" in text
        server_pid = int(text.split("(pid ", 1)[1].split(",", 1)[0])
        pids = _group_pids(server_pid)
        assert server_pid in pids
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, text + rest
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
