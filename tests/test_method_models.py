"""Whole methods served by Triton: one request per edit, the same result as the client-driven loop.

A real tritonserver serves every method model next to the components, in the default (hosted) design:
the engines in the method model, concurrent loops batched by the step scheduler; a second server
serves the BLS design. Each method's served result
(gRPC: the streaming twin, HTTP: the plain model) equals the in-process result for the same inputs
and seed; curl gets a PNG and a server-sent event stream; a cancelled stream stops its loop; bad
requests get one clear error and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import EXAMPLE, server_url
from PIL import Image
from ti2i.benchmarks.server_metrics import by_label, read_metrics
from ti2i.benchmarks.settle import settled
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.methods import components_for
from ti2i.client.registry import METHODS
from ti2i.client.remote import request_tensors, run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.errors import InvalidInputError, ServerUnavailableError
from ti2i.triton_models.method_repository import MethodOptions, servable_methods
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

pytestmark = pytest.mark.timeout(600)

SMALL = dict(height=32, width=32)
# each method's request: tiny sizes and few steps keep the suite fast
REQUESTS = {
    "txt2img": dict(prompt="hills at dusk", steps=3, seed=3, **SMALL),
    "sdedit": dict(prompt="a watercolor of a house", steps=4, strength=0.5, seed=11),
    "inpaint": dict(prompt="a full moon", steps=3, seed=2, **SMALL),
    "pix2pix": dict(prompt="make it snowy", steps=3, seed=4),
    "cyclediffusion": dict(prompt="a painting of a house", source_prompt="a photo of a house", steps=4, strength=0.5,
                           seed=5),
    "ddib": dict(prompt="a painting of a house", source_prompt="a photo of a house", steps=4, strength=0.5),
    "svd": dict(frames=2, steps=2, seed=1, **SMALL),
    "videoldm": dict(prompt="clouds drifting", frames=2, steps=3, strength=0.5, seed=6, **SMALL),
}


@pytest.fixture(scope="module")
def method_server(engines, tmp_path_factory):
    """Every method the SD engine directory serves, two active requests each, a queue of one."""
    root = tmp_path_factory.mktemp("methods")
    repository = write_repository(engines, root / "repository", methods=servable_methods(engines.components),
                                  method_options=MethodOptions(active=2, max_queue=1))
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def bls_method_server(engines, tmp_path_factory):
    """The other design: the same method models calling the component models by BLS."""
    root = tmp_path_factory.mktemp("methods-bls")
    repository = write_repository(engines, root / "repository", methods=servable_methods(engines.components),
                                  method_options=MethodOptions(design="bls", active=2, max_queue=1))
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


@pytest.fixture(scope="module")
def svd_method_server(svd_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods-svd")
    repository = write_repository(svd_engines, root / "repository", methods=["svd"])
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


def _inputs(method: str, image: Image.Image) -> dict:
    values = dict(REQUESTS[method])
    if "image" in METHODS[method].images:
        values["image"] = image
    if "mask" in METHODS[method].images:
        values["mask"] = centered_ellipse_mask(image.size)
    return values


def _sdedit_repository(engines, tmp_path: Path, **options) -> Path:
    """A repository of SDEdit's components and its method models with these `MethodOptions`."""
    return write_repository(engines, tmp_path / "repository", models=components_for(["sdedit"]), methods=["sdedit"],
                            method_options=MethodOptions(**options))


def _pixels(result) -> np.ndarray:
    return np.asarray(result.frames if hasattr(result, "frames") else result.image)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("method", list(METHODS))
def test_served_method_equals_the_client_side_loop(method, protocol, request, example_image):
    svd = method == "svd"
    server = request.getfixturevalue("svd_method_server" if svd else "method_server")
    engine_dir = request.getfixturevalue("svd_engines" if svd else "engines").root
    values = _inputs(method, example_image)
    # plain infer over both protocols (the streaming twin is compared with it below): one loop process per method
    served = run_remote(server_url(server, protocol), METHODS[method], progress=False, stream=False, **values)
    with InProcessRunner(engine_dir) as runner:
        local = METHODS[method](runner, **values)
    assert _pixels(served).shape == _pixels(local).shape
    np.testing.assert_array_equal(_pixels(served), _pixels(local))  # bit-identical images
    assert np.abs(served.array - np.round(local.array * 255) / 255).max() <= 1e-6


def test_bls_design_gives_each_method_the_client_side_result(bls_method_server, engines, example_image):
    """Every method of the SD engines through the BLS design (gRPC stream, HTTP plain): the client's pixels."""
    for method in servable_methods(engines.components):
        values = _inputs(method, example_image)
        with InProcessRunner(engines.root) as runner:
            local = METHODS[method](runner, **values)
        for protocol in ("grpc", "http"):
            served = run_remote(server_url(bls_method_server, protocol), METHODS[method], progress=False, **values)
            np.testing.assert_array_equal(_pixels(served), _pixels(local), err_msg=f"{method} over {protocol}")


def _compute(server, model: str) -> tuple[int, int]:
    """(executions, nanoseconds inside `execute`) of `model` so far, once settled (counted after the reply)."""
    def read() -> tuple[int, int]:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics(model, headers=server.api_headers, as_json=True)["model_stats"]
        compute = [s["inference_stats"]["compute_infer"] for s in stats]
        return sum(int(c.get("count", 0)) for c in compute), sum(int(c.get("ns", 0)) for c in compute)
    return settled(read)


@pytest.mark.parametrize("design", ["hosted", "bls"])
def test_execute_hands_the_request_to_a_thread_and_returns(design, request, example_image):
    """In both designs the instance is back with Triton's scheduler long before the response leaves: an
    instance still inside `execute` when the next request arrives can leave that request to Triton 2.51's
    lost wake-up, 500 ms (`ti2i.benchmarks.queue_stall`)."""
    server = request.getfixturevalue("method_server" if design == "hosted" else "bls_method_server")
    values = {**_inputs("sdedit", example_image), "steps": 20, "strength": 1.0}
    run_remote(server_url(server, "grpc"), METHODS["sdedit"], progress=False, stream=False, **values)  # warm
    count, ns = _compute(server, "sdedit")
    start = time.perf_counter()
    result = run_remote(server_url(server, "grpc"), METHODS["sdedit"], progress=False, stream=False, **values)
    wall = time.perf_counter() - start
    count2, ns2 = _compute(server, "sdedit")
    assert _pixels(result).shape == (48, 64, 3) and count2 - count == 1
    assert (ns2 - ns) / 1e9 < 0.2 * wall, f"execute held the instance {(ns2 - ns) / 1e9:.3f} s of {wall:.3f} s"


def test_many_short_concurrent_requests_leave_the_server_alive(engines, example_image, tmp_path):
    """Original failure: at 8 concurrent tiny SDEdits tritonserver died of SIGSEGV in
    `TRITONBACKEND_ResponseFactoryIsCancelled`: the cancel watcher asked about a request whose final response
    had just freed it. Polling every millisecond, 200 two-step requests crashed the old code within 2 s."""
    repository = _sdedit_repository(engines, tmp_path, active=8, max_queue=8, cancel_poll_ms=1, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 2}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")

        def one(i: int):
            return run_remote(url, METHODS["sdedit"], progress=False, stream=i % 2 == 0, **{**values, "seed": i})

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(96)))
        assert server.is_alive(), server.log_tail()
        assert "Signal (11)" not in server.log_tail()
    assert all(_pixels(r).shape == (48, 64, 3) for r in results)


def _stub_cpu_s(server, model: str) -> dict[int, float]:
    """CPU seconds so far of each python-backend process (Triton instance) of `model`, by pid."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        # fields after comm: state ppid ... utime (12th) stime (13th)
        if len(args) > 1 and args[1].endswith(f"/{model}/1/model.py".encode()) and stat[1] == str(server.pid):
            found[int(entry.name)] = (int(stat[11]) + int(stat[12])) / ticks
    return found


def test_hosted_processes_share_the_active_requests(engines, example_image, tmp_path):
    """--method-processes 2 with 4 active: two processes, each with its own engines, sharing 4 places; four
    concurrent requests keep both busy, their metrics count the requests and the merged steps of each, and
    each result is the one the request gets in-process."""
    repository = _sdedit_repository(engines, tmp_path, active=4, processes=2, max_queue=4, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 60, "strength": 1.0}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        before = _stub_cpu_s(server, "sdedit")
        assert len(before) == 2, before

        def one(seed: int):
            return run_remote(url, METHODS["sdedit"], progress=False, stream=False, **{**values, "seed": seed})

        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(one, range(4)))
        after = _stub_cpu_s(server, "sdedit")
        metrics = settled(lambda: read_metrics(server.metrics_url), wait_s=0.6)  # sent every 0.5 s
        # the processes split the cores: 2 processes of 2 intra-op threads on 2 cores served less, and slower
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        log = server.log_path.read_text()
        started = f"sdedit: one of 2 processes sharing 4 places, engines on {threads} intra-op thread(s)"
        assert log.count(started) == 2, server.log_tail()
    busy = {pid: after[pid] - before[pid] for pid in before}
    # one 60-step request costs ~0.3 s of CPU; a process left idle spends only its cancel watcher's wake-ups
    assert all(seconds >= 0.1 for seconds in busy.values()), busy
    requests = by_label(metrics, "ti2i_method_requests_total", "instance", model="sdedit")
    assert set(requests) == {"sdedit_0_0", "sdedit_0_1"} and sum(requests.values()) == 4, metrics
    assert by_label(metrics, "ti2i_method_running", "instance", model="sdedit") == \
        {"sdedit_0_0": 0.0, "sdedit_0_1": 0.0}, metrics
    executions, calls, samples = (by_label(metrics, name, "instance", model="sdedit", component="unet")
                                  for name in ("ti2i_step_executions_total", "ti2i_step_calls_total",
                                               "ti2i_step_samples_total"))
    per_request = sum(calls.values()) / 4  # equal loops: the same UNet calls each ([uncond, cond] in each)
    assert per_request >= 60, metrics
    for instance, count in requests.items():
        assert calls.get(instance, 0) == count * per_request, metrics
        assert samples.get(instance, 0) == 2 * calls.get(instance, 0), metrics
    # 4 loops in 2 processes: one holds two or more, and merges their steps
    assert sum(executions.values()) < sum(calls.values()), metrics
    with InProcessRunner(engines.root) as runner:
        for seed, result in enumerate(served):
            np.testing.assert_array_equal(_pixels(result), _pixels(METHODS["sdedit"](runner, **{**values,
                                                                                          "seed": seed})))


def test_a_burst_of_requests_is_not_held_by_the_queue(engines, example_image, tmp_path):
    """Original failure: with Triton's queue policy on the method model, its batcher lost the wake-up of
    requests that arrived while the instance was in `execute`: in rounds of 4 requests sent at once to 4
    places, 9 of 48 waited 0.5 or 1.0 s in Triton's queue. The model keeps its own queue now, Triton none:
    no request of a burst that fits the places waits for a place."""
    repository = _sdedit_repository(engines, tmp_path, active=4, max_queue=4, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 20, "strength": 1.0}
    waits = "sdedit: all 4 places are taken; a request waits"
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        with ThreadPoolExecutor(4) as pool:
            for _ in range(6):
                assert all(_pixels(r).shape == (48, 64, 3) for r in pool.map(
                    lambda seed: run_remote(url, METHODS["sdedit"], progress=False, stream=False,
                                            **{**values, "seed": seed}), range(4)))
        stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(
            "sdedit", headers=server.api_headers, as_json=True)["model_stats"][0]["inference_stats"]
        assert server.log_path.read_text().count(waits) == 0, server.log_tail()
    queued_s = int(stats["queue"].get("ns", 0)) / 1e9
    assert int(stats["success"]["count"]) == 24 and queued_s < 0.4, stats  # one stall alone was 0.5 s


def test_a_request_past_the_queue_timeout_is_refused_and_the_next_runs(engines, example_image, tmp_path):
    """The model's own queue keeps the timeout Triton's did: with 1 place and a 0.3 s queue timeout, a request
    sent while a long one runs is refused (UNAVAILABLE, naming the wait); the long one and the next succeed.
    Both streamed (the `_stream` twin has its own place), so the second goes once the first has started."""
    repository = _sdedit_repository(engines, tmp_path, active=1, max_queue=2, queue_timeout_us=300_000, preload=True)
    values = _inputs("sdedit", example_image)
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        started = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            long = pool.submit(run_remote, url, METHODS["sdedit"], progress=lambda *step: started.set(),
                               **{**values, "steps": 400, "strength": 1.0})
            assert started.wait(120), long
            with pytest.raises(ServerUnavailableError, match=r"waited 0.3 s in the queue"):
                run_remote(url, METHODS["sdedit"], progress=False, **values)
            assert _pixels(long.result(timeout=300)).shape == (48, 64, 3)
        assert "sdedit_stream: all 1 places are taken; a request waits" in server.log_path.read_text()
        assert _pixels(run_remote(url, METHODS["sdedit"], progress=False, **values)).shape == (48, 64, 3)


def test_hosted_lanes_run_concurrent_requests_in_one_process(engines, example_image, tmp_path):
    """--method-lanes 2 with 4 active: one process, its step scheduler ticking two lanes on half the cores each;
    four concurrent requests merge steps in it, and each result is the one the request gets in-process."""
    repository = _sdedit_repository(engines, tmp_path, active=4, lanes=2, max_queue=4, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 20, "strength": 1.0}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        with ThreadPoolExecutor(4) as pool:
            served = list(pool.map(lambda seed: run_remote(url, METHODS["sdedit"], progress=False, stream=False,
                                                           **{**values, "seed": seed}), range(4)))
        metrics = settled(lambda: read_metrics(server.metrics_url), wait_s=0.6)
        threads = max(1, len(os.sched_getaffinity(0)) // 2)
        assert f"sdedit: one of 1 processes sharing 4 places in 2 lanes, engines on {threads} intra-op thread(s)" in \
            server.log_path.read_text(), server.log_tail()
    assert by_label(metrics, "ti2i_method_requests_total", "instance", model="sdedit") == {"sdedit_0_0": 4.0}
    executions, calls = (by_label(metrics, name, "instance", model="sdedit", component="unet")["sdedit_0_0"]
                         for name in ("ti2i_step_executions_total", "ti2i_step_calls_total"))
    assert executions < calls, metrics
    with InProcessRunner(engines.root) as runner:
        for seed, result in enumerate(served):
            np.testing.assert_array_equal(_pixels(result), _pixels(METHODS["sdedit"](runner, **{**values,
                                                                                          "seed": seed})))


def test_no_request_waits_while_a_place_is_free_in_another_process(engines, example_image, tmp_path):
    """Original failure: with a limit per process (2 of the 4 places each), Triton handed a third request to a
    process whose 2 loops were busy while the other process had a free place, and it waited there for a whole
    request (1 to 3 of 10 rounds of 4 concurrent requests). The places are now the model's: in 10 rounds of 4 no
    request waits; a 5th at once does."""
    repository = _sdedit_repository(engines, tmp_path, active=4, processes=2, max_queue=4, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 30, "strength": 1.0}
    waits = "sdedit: all 4 places are taken; a request waits"
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")

        def one(seed: int):
            return run_remote(url, METHODS["sdedit"], progress=False, stream=False, **{**values, "seed": seed})

        with ThreadPoolExecutor(5) as pool:
            for _ in range(10):  # each round starts once the last has its answers (and so its places back)
                assert all(_pixels(r).shape == (48, 64, 3) for r in pool.map(one, range(4)))
            assert server.log_path.read_text().count(waits) == 0, server.log_tail()
            assert len(list(pool.map(one, range(5)))) == 5
        assert server.log_path.read_text().count(waits) >= 1, server.log_tail()


def test_plain_grpc_infer_and_base64_input_match_the_stream(method_server, example_image):
    values = _inputs("sdedit", example_image)
    streamed = run_remote(server_url(method_server, "grpc"), METHODS["sdedit"], progress=False, **values)
    buffer = io.BytesIO()
    example_image.save(buffer, format="PNG")
    values["image"] = base64.b64encode(buffer.getvalue())  # JSON clients send the file's base64 text
    plain = run_remote(server_url(method_server, "grpc"), METHODS["sdedit"], progress=False, stream=False, **values)
    np.testing.assert_array_equal(_pixels(plain), _pixels(streamed))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_remote_client_keeps_one_connection_for_its_requests(method_server, example_image, protocol, monkeypatch):
    """A `RemoteMethodClient` connects once and serves plain and streamed requests over that one connection
    (gRPC: a stream each, one after another), each seed's result the one `run_remote` gets."""
    import ti2i.client.remote as remote

    made = []
    connect = remote.client_for
    monkeypatch.setattr(remote, "client_for", lambda *a: made.append(a) or connect(*a))
    values = _inputs("sdedit", example_image)
    url = server_url(method_server, protocol)
    expected = [run_remote(url, METHODS["sdedit"], progress=False, stream=False, **{**values, "seed": s})
                for s in (1, 2)]
    made.clear()
    with remote.RemoteMethodClient(url) as client:
        got = [client.run(METHODS["sdedit"], progress=False, stream=protocol == "grpc" and i % 2 == 0,
                          **{**values, "seed": 1 + i % 2}) for i in range(4)]
        with pytest.raises(InvalidInputError, match="strength"):  # the server's INVALID_ARG; the client goes on
            client.run(METHODS["sdedit"], progress=False, stream=False, **{**values, "strength": 2.0})
        again = client.run(METHODS["sdedit"], progress=False, stream=False, **{**values, "seed": 2})
    assert len(made) == 1
    for i, result in enumerate(got):
        np.testing.assert_array_equal(_pixels(result), _pixels(expected[i % 2]))
    np.testing.assert_array_equal(_pixels(again), _pixels(expected[1]))


def test_a_kept_remote_client_serves_again_once_a_restarted_server_is_ready(engines, example_image, tmp_path):
    """Original failure: with the server killed (and restarted by its supervisor), a kept HTTP connection raised
    geventhttpclient's HTTPConnectionClosed rather than ServerUnavailableError, and a kept gRPC channel still
    failed 3.7 s after the server was ready again, waiting out its reconnect backoff."""
    import signal

    from ti2i.client.remote import RemoteMethodClient

    repository = _sdedit_repository(engines, tmp_path, preload=True)
    values = {**_inputs("sdedit", example_image), "steps": 2}
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server:
        clients = {p: RemoteMethodClient(server_url(server, p)) for p in ("grpc", "http")}
        expected = {p: _pixels(c.run(METHODS["sdedit"], progress=False, stream=False, **values))
                    for p, c in clients.items()}
        old = server.pid

        def ready() -> bool:
            try:
                return server.pid != old and httpclient.InferenceServerClient(server.http_url).is_model_ready("sdedit")
            except Exception:
                return False

        os.kill(old, signal.SIGKILL)
        failures = 0
        deadline = time.monotonic() + 120
        while not ready() and time.monotonic() < deadline:  # a user retrying while it is down
            for client in clients.values():
                try:
                    client.run(METHODS["sdedit"], progress=False, stream=False, **values)
                except ServerUnavailableError:  # the typed error, whatever the connection saw
                    failures += 1
            time.sleep(0.2)
        assert ready() and failures >= 2, server.log_tail()
        for protocol, client in clients.items():  # the first request once ready succeeds, on the kept client
            np.testing.assert_array_equal(
                _pixels(client.run(METHODS["sdedit"], progress=False, stream=False, **values)), expected[protocol])
            client.close()


def _json_body(values: dict) -> dict:
    tensors = request_tensors(METHODS["sdedit"], **values)
    inputs = []
    for name, value in tensors.items():
        if value.dtype == object:
            data = [v.decode() if name != "image" else base64.b64encode(v).decode() for v in value]
            inputs.append({"name": name, "shape": [1], "datatype": "BYTES", "data": data})
        else:
            datatype = {"f": "FP64", "i": "INT64", "b": "BOOL"}[value.dtype.kind]
            inputs.append({"name": name, "shape": [1], "datatype": datatype, "data": value.tolist()})
    return {"inputs": inputs, "outputs": [{"name": "encoded_base64"}]}


CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="no curl binary on this machine")
def test_curl_posts_an_image_and_gets_a_png(method_server, engines, example_image, tmp_path):
    values = _inputs("sdedit", example_image)
    body = tmp_path / "request.json"
    body.write_text(json.dumps(_json_body(values)))
    proc = subprocess.run([CURL, "-sS", "--fail-with-body", "-X", "POST", "-H", "Content-Type: application/json",
                           "--data-binary", f"@{body}", f"http://{method_server.http_url}/v2/models/sdedit/infer"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    answer = json.loads(proc.stdout)
    (output,) = answer["outputs"]
    png = base64.b64decode(output["data"][0])
    assert png.startswith(b"\x89PNG")
    with InProcessRunner(engines.root) as runner:
        local = METHODS["sdedit"](runner, **values)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(local.image))


@pytest.mark.skipif(CURL is None, reason="no curl binary on this machine")
def test_curl_generate_stream_shows_progress_before_the_result(method_server, example_image, tmp_path):
    buffer = io.BytesIO()
    example_image.save(buffer, format="PNG")
    body = {"image": base64.b64encode(buffer.getvalue()).decode(), "prompt": "a watercolor of a house",
            "steps": 4, "strength": 0.5, "seed": 11}
    proc = subprocess.run([CURL, "-sS", "-N", "--fail-with-body", "-X", "POST", "-d", json.dumps(body),
                           f"http://{method_server.http_url}/v2/models/sdedit_stream/generate_stream"],
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line[len("data:"):]) for line in proc.stdout.decode().splitlines()
              if line.startswith("data:")]
    progress = [e for e in events if "step" in e]
    assert progress and progress[0]["step"] == 0 and progress[-1]["step"] == progress[-1]["steps"] >= 2
    assert all(e["elapsed"] >= 0 for e in progress)
    assert "encoded_base64" in events[-1] and all("encoded_base64" not in e for e in events[:-1])
    assert base64.b64decode(events[-1]["encoded_base64"]).startswith(b"\x89PNG")


def _unet_count(server) -> int:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics("unet", headers=server.api_headers, as_json=True)["model_stats"]
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def _stream(server, values: dict, outputs: list[str]) -> tuple[grpcclient.InferenceServerClient, queue.Queue]:
    """A started gRPC stream to sdedit_stream; its responses arrive in the queue as (result, error)."""
    tensors = request_tensors(METHODS["sdedit"], **{k: v for k, v in values.items() if k != "preview_every"})
    if "preview_every" in values:
        tensors["preview_every"] = np.array([values["preview_every"]], dtype=np.int64)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, value in tensors.items():
        infer_input = grpcclient.InferInput(name, [1], "BYTES" if value.dtype == object else
                                            {"f": "FP64", "i": "INT64"}[value.dtype.kind])
        infer_input.set_data_from_numpy(value)
        inputs.append(infer_input)
    client.async_stream_infer("sdedit_stream", inputs, outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                              enable_empty_final_response=True)
    return client, responses


def test_stream_sends_latent_previews_every_k_steps(method_server, example_image):
    values = {**_inputs("sdedit", example_image), "steps": 8, "strength": 1.0, "preview_every": 2}
    client, responses = _stream(method_server, values, ["step", "preview", "pixels"])
    previews, final = {}, None
    try:
        while final is None:
            result, error = responses.get(timeout=120)
            assert error is None, error
            if result.as_numpy("preview") is not None:
                previews[int(result.as_numpy("step")[0])] = result.as_numpy("preview")
            if result.get_response().parameters["triton_final_response"].bool_param:
                final = result.as_numpy("pixels")
    finally:
        client.stop_stream()
        client.close()
    assert sorted(previews) and all(step % 2 == 0 and step > 0 for step in previews), sorted(previews)
    assert all(p.dtype == np.uint8 and p.shape == (6, 8, 3) for p in previews.values())  # the 48×64 latent grid
    assert final.shape == (48, 64, 3)


def _cancel_after_a_few_steps(server, example_image) -> None:
    values = _inputs("sdedit", example_image)
    values.update(steps=200, strength=1.0)  # long enough to cancel
    client, responses = _stream(server, values, ["step"])
    for _ in range(4):  # a few steps run
        result, error = responses.get(timeout=120)
        assert error is None, error
    client.stop_stream(cancel_requests=True)
    client.close()


def _stopped_at(server, deadline_s: float = 60) -> int:
    """The step at which the model says the cancelled loop stopped (its own log line)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        found = re.findall(r"sdedit_stream: cancelled at \w+ step (\d+) of \d+", server.log_path.read_text())
        if found:
            return int(found[-1])
        time.sleep(0.2)
    raise AssertionError("the model never reported the cancelled loop")


def test_cancelled_stream_stops_the_loop_and_the_server_serves_on(method_server, example_image):
    _cancel_after_a_few_steps(method_server, example_image)
    assert _stopped_at(method_server) < 100  # of 201
    again = run_remote(server_url(method_server, "grpc"), METHODS["sdedit"], progress=False,
                       **_inputs("sdedit", example_image))
    assert _pixels(again).shape == (48, 64, 3)


def test_bls_cancelled_stream_stops_the_loop(bls_method_server, example_image):
    before = _unet_count(bls_method_server)
    _cancel_after_a_few_steps(bls_method_server, example_image)
    assert _stopped_at(bls_method_server) < 100
    deadline, counts = time.monotonic() + 60, []
    while time.monotonic() < deadline:  # Triton's own count of UNet executions settles well short of 201 steps
        counts.append(_unet_count(bls_method_server))
        if len(counts) >= 3 and counts[-1] == counts[-3]:
            break
        time.sleep(0.5)
    assert counts[-1] - before < 100, counts


BAD = [
    ("undecodable image", dict(image=b"\x89PNG\r\n\x1a\nnot really a png"), "not a readable image"),
    ("base64 of no image", dict(image=base64.b64encode(b"hello")), "neither an image file"),
    ("missing prompt", dict(prompt=None), "missing input 'prompt'"),
    ("strength out of range", dict(strength=1.5), "strength must be in (0.0, 1.0]"),
    ("steps zero", dict(steps=0), "steps must be an integer"),
    ("unknown format", dict(format="bmp"), "format 'bmp' is not one of png"),
]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case,change,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_clear_error_and_the_server_stays_ready(case, change, expected, protocol,
                                                                   method_server, example_image):
    values = {**_inputs("sdedit", example_image), **change}
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(InvalidInputError) as info:
        run_remote(server_url(method_server, protocol), METHODS["sdedit"], progress=False, stream=False, **values)
    assert expected in str(info.value)
    with httpclient.InferenceServerClient(method_server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("sdedit")


def test_a_hosted_model_without_memory_for_its_engines_says_so_and_serves_on(engines, tmp_path, monkeypatch,
                                                                            example_image):
    """A hosted method model loads its own copy of the engines at its first request; where the server may not
    take that much more memory, the request gets one UNAVAILABLE error naming the engine and the way out."""
    repository = write_repository(engines, tmp_path / "repository", models=components_for(["sdedit"]),
                                  methods=["sdedit"])
    monkeypatch.setenv("TI2I_MEMORY_BUDGET", "1M")  # the server's whole budget: less than any engine's weights
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        for protocol in ("http", "grpc"):
            with pytest.raises(ServerUnavailableError, match=r"loading \w+ needs about .*--method-design bls"):
                run_remote(server_url(server, protocol), METHODS["sdedit"], progress=False, stream=False,
                           **_inputs("sdedit", example_image))
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert client.is_server_ready() and client.is_model_ready("sdedit")


def test_over_the_active_limit_with_a_full_queue_is_rejected(method_server, example_image):
    """Two active, one queued: of five long requests at once some are rejected with UNAVAILABLE; then all is well."""
    values = {**_inputs("sdedit", example_image), "steps": 40, "strength": 1.0}
    outcomes: list = []

    def call() -> None:
        try:
            run_remote(server_url(method_server, "http"), METHODS["sdedit"], progress=False, **values)
            outcomes.append("ok")
        except ServerUnavailableError as err:
            outcomes.append(str(err))

    threads = [threading.Thread(target=call) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    rejected = [o for o in outcomes if o != "ok"]
    assert len(outcomes) == 5 and rejected and all("queue" in o for o in rejected), outcomes
    assert outcomes.count("ok") >= 2
    again = run_remote(server_url(method_server, "http"), METHODS["sdedit"], progress=False,
                       **_inputs("sdedit", example_image))
    assert _pixels(again).shape == (48, 64, 3)


def test_cli_remote_shows_progress_and_writes_the_image(method_server, tmp_path, capsys):
    from ti2i.app.cli import main

    out = tmp_path / "remote.png"
    argv = ["sdedit", "--server", server_url(method_server, "grpc"), "--remote", "--image", str(EXAMPLE),
            "--prompt", "a watercolor of a house", "--steps", "4", "--strength", "0.5", "--height", "48",
            "--width", "64", "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "sdedit" in captured.err and f"wrote {out}" in captured.out  # the progress bar, then the file
    assert Image.open(out).size == (64, 48)
    assert main([*argv[:-2], "--out", str(tmp_path / "x.png"), "--steps", "0"]) == 2
    assert "steps must be an integer" in capsys.readouterr().err
