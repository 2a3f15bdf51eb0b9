"""Whole methods served by Triton: one request per edit, the same result as the client-driven loop.

A real tritonserver serves every method model next to the components, all entry points into the family's
engine core (one copy of the engines, every request's steps batched by one scheduler). Each method's served result
(gRPC: the streaming twin, HTTP: the plain model) equals the in-process result for the same inputs
and seed; curl gets a PNG and a server-sent event stream; a cancelled stream stops its loop; bad
requests get one clear error and the server keeps serving.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import EXAMPLE, server_url
from PIL import Image
from ti2i.benchmarks.memory import pss_mb
from ti2i.benchmarks.server_metrics import by_label, read_metrics
from ti2i.benchmarks.settle import settled
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.methods import components_for
from ti2i.client.registry import METHODS
from ti2i.client.remote import request_tensors, run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.errors import InvalidInputError, ServerUnavailableError
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.method_repository import servable_methods
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

pytestmark = pytest.mark.timeout(600)

SMALL = dict(height=32, width=32)
# each method's request: tiny sizes and few steps keep the suite fast
REQUESTS = {
    "txt2img": dict(prompt="hills at dusk", steps=3, seed=3, scheduler="dpm++sde-karras", **SMALL),
    "sdedit": dict(prompt="a watercolor of a house", steps=4, strength=0.5, seed=11),
    "inpaint": dict(prompt="a full moon", steps=3, seed=2, **SMALL),
    "pix2pix": dict(prompt="make it snowy", steps=3, seed=4, scheduler="euler-a"),
    "cyclediffusion": dict(prompt="a painting of a house", source_prompt="a photo of a house", steps=4, strength=0.5,
                           seed=5),
    "ddib": dict(prompt="a painting of a house", source_prompt="a photo of a house", steps=4, strength=0.5),
    "svd": dict(frames=2, steps=2, seed=1, **SMALL),
    "videoldm": dict(prompt="clouds drifting", frames=2, steps=3, strength=0.5, seed=6, **SMALL),
}

STREAM_LOAD_S = 45  # 8 streaming clients; before the fix the first stub died after 8-20 s


@pytest.fixture(scope="module")
def method_server(engines, tmp_path_factory):
    """Every method the SD engine directory serves, two active requests each, a queue of one."""
    root = tmp_path_factory.mktemp("methods")
    repository = write_repository(engines, root / "repository", methods=servable_methods(engines.components),
                                  core_options=CoreOptions(active=2, max_queue=1))
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
    """A repository of SDEdit's components and its method models, its core with these `CoreOptions`."""
    return write_repository(engines, tmp_path / "repository", models=components_for(["sdedit"]), methods=["sdedit"],
                            core_options=CoreOptions(**options))


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


def _compute(server, model: str) -> tuple[int, int]:
    """(executions, nanoseconds inside `execute`) of `model` so far, once settled (counted after the reply)."""
    def read() -> tuple[int, int]:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics(model, headers=server.api_headers, as_json=True)["model_stats"]
        compute = [s["inference_stats"]["compute_infer"] for s in stats]
        return sum(int(c.get("count", 0)) for c in compute), sum(int(c.get("ns", 0)) for c in compute)
    return settled(read)


def test_execute_hands_the_request_to_a_thread_and_returns(method_server, example_image):
    """The entry point is back with Triton's scheduler long before the response leaves: an instance still
    inside `execute` when the next request arrives can leave that request to Triton 2.51's lost wake-up,
    500 ms (`ti2i.benchmarks.queue_stall`)."""
    server = method_server
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
    had just freed it."""
    repository = _sdedit_repository(engines, tmp_path, active=8, max_queue=8)
    values = {**_inputs("sdedit", example_image), "steps": 2}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")

        def one(i: int):
            # bounded, as in the mixed-methods test: a stub that dies mid-stream must fail this, not hang the suite
            return run_remote(url, METHODS["sdedit"], progress=False, stream=i % 2 == 0, timeout_s=300,
                              **{**values, "seed": i})

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(96)))
        assert server.is_alive(), server.log_tail()
        assert "Signal (11)" not in server.log_tail()
    assert all(_pixels(r).shape == (48, 64, 3) for r in results)


def test_streams_under_load_leave_every_stub_alive(engines, example_image, tmp_path):
    """Original failure: with 8 clients streaming short tiny SDEdits, the stream twin's stub died every 10-20 s
    (``Segmentation fault``, ``double free or corruption``) and took its clients' requests with it; once
    tritonserver itself aborted. Triton 2.51's python backend freed numpy arrays without the interpreter lock
    in two places: a BLS response stream's answers once another stub thread dropped the stream, and the
    outputs a response holds but its request did not ask for (here ``elapsed``)."""
    from ti2i.client.remote import RemoteMethodClient
    from ti2i.triton_models.supervisor import stub_processes

    repository = _sdedit_repository(engines, tmp_path, active=8, max_queue=8)
    values = {**_inputs("sdedit", example_image), "steps": 2, "strength": 0.5}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url, stubs = server_url(server, "grpc"), stub_processes(server.pid)
        until = time.monotonic() + STREAM_LOAD_S

        def client(k: int) -> tuple[int, str | None]:
            answered = 0
            try:
                with RemoteMethodClient(url, timeout_s=60) as remote:
                    while time.monotonic() < until:
                        remote.run(METHODS["sdedit"], progress=False, stream=True, **{**values, "seed": k})
                        answered += 1
            except Exception as err:  # reported below with the server's log, which says why
                return answered, f"client {k} after {answered} answers: {type(err).__name__}: {err}"
            return answered, None

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(client, range(8)))
        failed = [error for _, error in outcomes if error is not None]
        if failed:
            _stacks_asked(server)  # where each stub's threads are, into the log
        log = server.log_tail(200_000)
        assert stub_processes(server.pid) == stubs and not failed, "\n".join([*failed, log[-30000:]])
    assert not re.search(r"Fatal Python error|double free|corruption|Signal \(\d+\)", log), log[-6000:]
    assert sum(answered for answered, _ in outcomes) > 8


def test_a_burst_of_requests_is_not_held_by_the_queue(engines, example_image, tmp_path):
    """Original failure: with Triton's queue policy on the method model, its batcher lost the wake-up of
    requests that arrived while the instance was in `execute`: in rounds of 4 requests sent at once to 4
    places, 9 of 48 waited 0.5 or 1.0 s in Triton's queue. The engine core keeps the queue, Triton none:
    no request of a burst that fits the places waits."""
    repository = _sdedit_repository(engines, tmp_path, active=4, max_queue=4)
    values = {**_inputs("sdedit", example_image), "steps": 20, "strength": 1.0}
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        with ThreadPoolExecutor(4) as pool:
            for _ in range(6):
                assert all(_pixels(r).shape == (48, 64, 3) for r in pool.map(
                    lambda seed: run_remote(url, METHODS["sdedit"], progress=False, stream=False, timeout_s=300,
                                            **{**values, "seed": seed}), range(4)))
        stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(
            "sdedit", headers=server.api_headers, as_json=True)["model_stats"][0]["inference_stats"]
    queued_s = int(stats["queue"].get("ns", 0)) / 1e9
    assert int(stats["success"]["count"]) == 24 and queued_s < 0.4, stats  # one stall alone was 0.5 s


def test_a_request_past_the_queue_timeout_is_refused_and_the_next_runs(engines, example_image, tmp_path):
    """The core's queue keeps the timeout Triton's did: with 1 place and a 0.3 s queue timeout, a request sent
    while a long one runs is refused (UNAVAILABLE, naming the wait); the long one and the next succeed."""
    repository = _sdedit_repository(engines, tmp_path, active=1, max_queue=2, queue_timeout_s=0.3)
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
        assert _pixels(run_remote(url, METHODS["sdedit"], progress=False, **values)).shape == (48, 64, 3)


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


def _stacks_asked(server, model: str | None = None, wait_s: float = 1.0) -> None:
    """Ask each stub (of `model`, else all) for its threads' Python stacks, which it writes into the server log."""
    from ti2i.triton_models.supervisor import stub_processes

    for pid, name in stub_processes(server.pid).values():
        if model in (None, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
    time.sleep(wait_s)


def test_a_stub_leaves_its_stacks_in_the_log_on_a_crash_or_when_asked_and_none_at_unload(engines, example_image,
                                                                                        tmp_path):
    """Original annoyance: every model's unload (each stop of the server) wrote a "Fatal Python error:
    Segmentation fault" and a hundred lines of stacks (Triton 2.51's stub crashes tearing itself down, upstream
    python_backend #433), while a component entry's stub that crashed serving wrote nothing at all; and a stub
    that hung could not say where."""
    from ti2i.triton_models.supervisor import stub_processes

    repository = _sdedit_repository(engines, tmp_path)
    values = {**_inputs("sdedit", example_image), "steps": 2}
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server:
        run_remote(server_url(server, "grpc"), METHODS["sdedit"], progress=False, stream=False, **values)
        assert "core_metrics.py" not in server.log_path.read_text()
        _stacks_asked(server, "core")
        assert re.search(r"most recent call first\):\n(\s+File .*\n)*\s+File .*core_metrics\.py",
                         server.log_path.read_text())
        unet = next(pid for pid, model in stub_processes(server.pid).values() if model == "unet")
        os.kill(unet, signal.SIGSEGV)
        deadline = time.monotonic() + 60
        while "Fatal Python error" not in server.log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    log = (tmp_path / "server.log").read_text()
    assert log.count("Fatal Python error") == 1, log[-5000:]  # the crash while serving, nothing at the unloads
    assert "Segmentation fault" in log and "successfully unloaded 'unet'" in log


def test_a_kept_remote_client_serves_again_once_a_restarted_server_is_ready(engines, example_image, tmp_path):
    """Original failure: with the server killed (and restarted by its supervisor), a kept HTTP connection raised
    geventhttpclient's HTTPConnectionClosed rather than ServerUnavailableError, and a kept gRPC channel still
    failed 3.7 s after the server was ready again, waiting out its reconnect backoff."""
    import signal

    from ti2i.client.remote import RemoteMethodClient

    repository = _sdedit_repository(engines, tmp_path)
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


@pytest.mark.parametrize("endpoint", ["infer", "generate"])
def test_json_answers_are_strict_json_with_the_image_as_base64(endpoint, method_server, example_image):
    """A JSON infer naming no outputs, and `generate`, answered with the raw PNG bytes inside a JSON string:
    not UTF-8, refused by strict parsers. Raw bytes come only when a request names `encoded`."""
    values = {**_inputs("sdedit", example_image), "steps": 2}
    if endpoint == "infer":
        body = {"inputs": _json_body(values)["inputs"]}  # no outputs named
    else:
        body = {i["name"]: i["data"][0] for i in _json_body(values)["inputs"]}
    request = urllib.request.Request(f"http://{method_server.http_url}/v2/models/sdedit/{endpoint}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read().decode("utf-8"))  # strict: raises on raw bytes
    outputs = {o["name"]: o for o in answer["outputs"]} if endpoint == "infer" else answer
    assert "encoded" not in outputs
    text = outputs["encoded_base64"]["data"][0] if endpoint == "infer" else outputs["encoded_base64"]
    assert base64.b64decode(text).startswith(b"\x89PNG")


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
        found = re.findall(r"core: sdedit: cancelled at \w+ step (\d+) of \d+", server.log_path.read_text())
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


BAD = [
    ("undecodable image", dict(image=b"\x89PNG\r\n\x1a\nnot really a png"), "not a readable image"),
    ("base64 of no image", dict(image=base64.b64encode(b"hello")), "neither an image file"),
    ("missing prompt", dict(prompt=None), "missing input 'prompt'"),
    ("strength out of range", dict(strength=1.5), "strength must be in (0.0, 1.0]"),
    ("steps zero", dict(steps=0), "steps must be a positive integer"),
    ("unknown format", dict(format="bmp"), "format 'bmp' is not one of png"),
    ("unknown scheduler", dict(scheduler="warp-drive"), "unknown scheduler 'warp-drive'"),
    ("too many LCM steps", dict(scheduler="lcm", steps=80), "LCMScheduler cannot take 80 steps"),
]


@pytest.mark.parametrize("protocol,stream", [("grpc", False), ("grpc", True), ("http", False)])
@pytest.mark.parametrize("case,change,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_clear_error_and_the_server_stays_ready(case, change, expected, protocol, stream,
                                                                   method_server, example_image):
    """(Streamed, the error once came back as ServerUnavailableError: a gRPC stream's errors carry no code.)"""
    values = {**_inputs("sdedit", example_image), **change}
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(InvalidInputError) as info:
        run_remote(server_url(method_server, protocol), METHODS["sdedit"], progress=False, stream=stream, **values)
    assert expected in str(info.value)
    with httpclient.InferenceServerClient(method_server.http_url) as client:
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
    assert "steps must be a positive integer" in capsys.readouterr().err


MIXED = ["txt2img", "sdedit", "cyclediffusion", "ddib"]


def test_methods_share_one_copy_of_the_engines_and_their_unet_executions(engines, example_image, tmp_path):
    """One engine core per family: with sdedit warm, then txt2img, cyclediffusion, ddib and the stream twins
    warm too, the server holds no more than 1.3× the memory (a copy of the engines per method model held
    3.26×); 8 concurrent requests mixing the four methods share UNet executions (the core's metrics count
    executions holding samples of two or more methods), and each gets its in-process result."""
    repository = write_repository(engines, tmp_path / "repository", methods=MIXED,
                                  core_options=CoreOptions(active=8, max_queue=8))
    size = dict(height=example_image.height, width=example_image.width)
    requests = [{**_inputs(m, example_image), "steps": 20, **(size if m == "txt2img" else {"strength": 1.0}),
                 "seed": i} for i, m in enumerate(MIXED * 2)]
    for values, method in zip(requests, MIXED * 2):
        if method == "ddib":
            values.pop("seed")
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        url = server_url(server, "grpc")
        run_remote(url, METHODS["sdedit"], progress=False, stream=False, **_inputs("sdedit", example_image))
        alone = pss_mb(server.pid)
        with ThreadPoolExecutor(8) as pool:
            # a bounded wait: a python-backend stub that crashes mid-stream (Triton 2.51 segfaulted one once)
            # leaves its stream unanswered, and this test must then fail, not hang the suite
            served = list(pool.map(lambda mv: run_remote(url, METHODS[mv[0]], progress=False, stream=mv[1] % 2 == 1,
                                                         timeout_s=300, **mv[2]),
                                   [(m, i, v) for i, (m, v) in enumerate(zip(MIXED * 2, requests))]))
        warm = pss_mb(server.pid)
        metrics = settled(lambda: read_metrics(server.metrics_url), wait_s=0.6)  # sent every 0.5 s
    assert warm <= 1.3 * alone, (alone, warm)
    mixed = by_label(metrics, "ti2i_mixed_executions_total", "component", model="core")
    samples = by_label(metrics, "ti2i_samples_total", "method", model="core", component="unet")
    assert mixed.get("unet", 0) >= 1, metrics
    assert set(MIXED) <= set(samples), samples
    with InProcessRunner(engines.root) as runner:
        for method, values, result in zip(MIXED * 2, requests, served):
            np.testing.assert_array_equal(_pixels(result), _pixels(METHODS[method](runner, **values)), err_msg=method)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_work_over_the_server_ceiling_is_refused_and_the_server_serves_on(protocol, method_server, example_image):
    """A request for 100000 steps would hold a place for hours: over the ceiling (--max-steps) it gets one
    INVALID_ARG naming the limit, and the next request is answered."""
    url = server_url(method_server, protocol)
    with pytest.raises(InvalidInputError, match="limit of 1000"):
        run_remote(url, METHODS["sdedit"], progress=False, stream=False,
                   **{**_inputs("sdedit", example_image), "steps": 100000})
    assert _pixels(run_remote(url, METHODS["sdedit"], progress=False, stream=False,
                              **_inputs("sdedit", example_image))).shape == (48, 64, 3)


def _hang_up_after(url: str, body: bytes, model: str, seconds: float) -> None:
    """POST an infer request over plain HTTP, then leave before the answer (as a client whose timeout passed)."""
    host, port = url.split(":")
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        with contextlib.suppress(socket.timeout):
            sock.recv(1)


def test_http_clients_that_hang_up_free_their_places(engines, example_image, tmp_path):
    """Original failure: a client that sent a long SDEdit over HTTP and hung up after 3 s left its loop running
    (Triton's HTTP frontend does not cancel a request whose connection closed), so the next good request timed
    out while readiness said 200; nine such clients held every place. Now the HTTP guard cancels the request
    in the engine core when its client leaves: the loops stop within a step and a good request is answered."""
    repository = _sdedit_repository(engines, tmp_path, active=2, max_queue=8)
    long = _json_body({**_inputs("sdedit", example_image), "steps": 900, "strength": 1.0, "height": 256,
                       "width": 256})
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        with ThreadPoolExecutor(9) as pool:
            list(pool.map(lambda _: _hang_up_after(server.http_url, json.dumps(long).encode(), "sdedit", 3.0),
                          range(9)))
        start = time.monotonic()
        result = run_remote(server_url(server, "http"), METHODS["sdedit"], progress=False, stream=False,
                            **_inputs("sdedit", example_image))
        waited = time.monotonic() - start
        stopped = len(re.findall(r"core: sdedit: cancelled at", server.log_path.read_text()))
        with httpclient.InferenceServerClient(server.http_url) as client:
            assert client.is_server_ready()
    assert _pixels(result).shape == (48, 64, 3)
    assert waited < 30, waited  # the nine hung-up requests' 8100 steps at 256² take minutes
    assert stopped >= 2, server.log_tail()  # the running loops stopped (the queued ones left the queue)


@pytest.mark.parametrize("name,value", [("seed", 2**64), ("seed", 2**63), ("steps", 2**63)])
def test_integers_out_of_int64_are_a_client_error(name, value, method_server, example_image):
    """Original failure: Triton's JSON parser answers a number an INT64 cannot hold with 500 ("Unable to parse
    'data'"); it is the client's fault, so the guard answers 400 with the same message, and the server serves on."""
    body = _json_body({**_inputs("sdedit", example_image), "steps": 2})
    body["inputs"] = [i for i in body["inputs"] if i["name"] != name]
    body["inputs"].append({"name": name, "shape": [1], "datatype": "INT64", "data": [value]})
    request = urllib.request.Request(f"http://{method_server.http_url}/v2/models/sdedit/infer",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=60)
    assert info.value.code == 400 and "Unable to parse 'data'" in info.value.read().decode()
    with httpclient.InferenceServerClient(method_server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("sdedit")


def test_a_killed_engine_core_is_unavailable_then_serves_again(engines, example_image, tmp_path):
    """The core holds every engine of its family: when its stub dies, requests get one UNAVAILABLE line (not a
    500), readiness says so, the supervisor reloads the core, and the same request is then answered."""
    from ti2i.triton_models.supervisor import stub_processes

    repository = _sdedit_repository(engines, tmp_path)
    values = _inputs("sdedit", example_image)
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server:
        url = server_url(server, "http")
        run_remote(url, METHODS["sdedit"], progress=False, stream=False, **values)
        (pid, _), = [v for v in stub_processes(server.pid).values() if v[1] == "core"]
        os.kill(pid, signal.SIGKILL)
        outcomes, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                result = run_remote(url, METHODS["sdedit"], progress=False, stream=False, **values)
                break
            except ServerUnavailableError as err:
                outcomes.append(str(err))
            time.sleep(0.2)
        else:
            pytest.fail(f"the core never served again: {outcomes[-3:]}")
        events = list(server.supervisor.events)
    assert outcomes and all("\n" not in o and "engine core is unavailable" in o for o in outcomes), outcomes
    assert _pixels(result).shape == (48, 64, 3)
    assert any("fault: model 'core'" in e for e in events), events


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_whose_method_stub_dies_is_cancelled_in_the_core(protocol, engines, example_image, tmp_path):
    """Original failure: a request in flight in a method model's stub when that stub died was never answered
    (Triton 2.51 loses it), so its HTTP client waited for its own deadline, and its loop ran on to its last
    step in the core, holding the one place (`--active 1`): every request behind it waited. Now the HTTP
    guard answers it 503 and the supervisor cancels it in the core, whose place the next request takes."""
    from ti2i.triton_models.supervisor import stub_processes

    repository = _sdedit_repository(engines, tmp_path, active=1, queue_timeout_s=120)
    values = _inputs("sdedit", example_image)
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server:
        url = server_url(server, protocol)
        (pid, _), = [v for v in stub_processes(server.pid).values() if v[1] == "sdedit"]
        outcome: list = []
        long = threading.Thread(target=lambda: outcome.append(_outcome(lambda: run_remote(
            url, METHODS["sdedit"], progress=False, stream=False, timeout_s=30,
            **{**values, "steps": 999, "strength": 1.0}))), daemon=True)
        long.start()
        deadline = time.monotonic() + 60
        while not by_label(read_metrics(server.metrics_url), "ti2i_active_requests", "model").get("core"):
            assert time.monotonic() < deadline and long.is_alive(), (outcome, server.log_tail())
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
        if protocol == "http":  # the guard answers it (a gRPC client waits for its deadline: nothing answers it)
            long.join(timeout=20)
            assert not long.is_alive(), "the HTTP client waits on"
            assert isinstance(outcome[0], ServerUnavailableError), outcome
            assert "model 'sdedit' stopped while serving this request" in str(outcome[0]), outcome
        while True:  # the next request, sent again while the model reloads, takes the freed place
            try:
                after = run_remote(server_url(server, "http"), METHODS["sdedit"], progress=False, stream=False,
                                   timeout_s=20, **{**values, "steps": 2})
                break
            except ServerUnavailableError as err:
                assert time.monotonic() < deadline, (err, server.log_tail())
                time.sleep(0.2)
        assert long.is_alive() == (protocol == "grpc")  # answered while the long loop's client still waits
        assert _pixels(after).shape == (48, 64, 3)
        assert "sdedit's stub died: 1 of its requests cancelled" in server.log_tail()


def test_a_stream_whose_reader_stops_frees_its_core_place(engines, example_image, tmp_path):
    """Original failure: a python-backend stub of a streaming method model died mid-stream (a segfault under
    load); the core's loop then blocked for good sending that request's next progress response, holding its
    core place, so with every place held the server answered nothing more, and the streaming client waited
    for good too (closing its stream waited for the stream's end). Here the stub is stopped mid-stream."""
    from ti2i.triton_models.core_server import STALL_S
    from ti2i.triton_models.supervisor import stub_processes

    repository = _sdedit_repository(engines, tmp_path, active=1, max_queue=1, queue_timeout_s=3 * STALL_S)
    values = {**_inputs("sdedit", example_image), "steps": 999, "strength": 1.0}
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server:
        (reader, _), = [v for v in stub_processes(server.pid).values() if v[1] == "sdedit_stream"]

        def stop_the_reader(stage: str, step: int, steps: int) -> None:
            if step == 2:
                os.kill(reader, signal.SIGSTOP)

        outcome: list = []
        streamed = threading.Thread(target=lambda: outcome.append(_outcome(lambda: run_remote(
            server_url(server, "grpc"), METHODS["sdedit"], progress=stop_the_reader, stream=True,
            timeout_s=2 * STALL_S, **values))), daemon=True)
        streamed.start()
        try:
            time.sleep(2)
            after = run_remote(server_url(server, "http"), METHODS["sdedit"], progress=False, stream=False,
                               timeout_s=4 * STALL_S, **{**values, "steps": 4, "strength": 0.5})
            assert _pixels(after).shape == (48, 64, 3)
            streamed.join(timeout=3 * STALL_S)
        finally:
            os.kill(reader, signal.SIGKILL)
        assert not streamed.is_alive(), "the streaming client waits on"
        assert isinstance(outcome[0], ServerUnavailableError), outcome
        assert re.search(r"no result within .* \(the last response: sdedit step \d+ of \d+, [\d.]+ s in\)",
                         str(outcome[0])), outcome
        assert "took no response" in server.log_tail()


def _outcome(call):
    try:
        return call()
    except Exception as err:  # the outcome is what the test looks at
        return err


def test_a_streamed_request_that_fails_in_the_core_gets_its_error(svd_engines, example_image, tmp_path):
    """Original failure: a streamed request that failed in the engine core (an SVD at its default size over
    the memory budget: refused at its first UNet call) got no answer at all; the core's error response
    never reached the streaming twin, which waited for good (a plain request got the same error at once)."""
    from ti2i.triton_models.repository import RepositoryOptions

    weights = sum(c.memory.base for c in svd_engines.components.values() if c.file is not None and c.memory)
    repository = write_repository(svd_engines, tmp_path / "repository",
                                  RepositoryOptions(memory_budget=weights + 256 * 2**20), methods=["svd"])
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        with pytest.raises(InvalidInputError, match="unet_svd: .* over the memory budget"):
            run_remote(server_url(server, "grpc"), METHODS["svd"], progress=False, stream=True, timeout_s=60,
                       image=example_image, frames=4, steps=2, height=512, width=512)


def test_a_component_call_whose_stub_died_is_answered_once_it_is_reloaded(engines, tmp_path):
    """Original failure: a client-driven loop's UNet call that reached a stub just killed failed the whole
    request ("Stub process 'unet_0_0' is not healthy"), though the supervisor had the model serving again a
    second later. A component call is a pure function: the runner waits for the model to be ready and calls
    once more."""
    from ti2i.client.runners import TritonRunner
    from ti2i.spec import BATCH, sample_inputs
    from ti2i.triton_models.supervisor import stub_processes

    inputs = sample_inputs(engines.components["unet"].spec, {BATCH: 2, "height": 8, "width": 8}, seed=1)
    repository = _sdedit_repository(engines, tmp_path)
    with TritonServer(repository, log_path=tmp_path / "server.log", supervise=True) as server, \
            TritonRunner(f"grpc://{server.grpc_url}") as runner:
        first = runner.run("unet", **inputs)
        (pid, _), = [v for v in stub_processes(server.pid).values() if v[1] == "unet"]
        os.kill(pid, signal.SIGKILL)
        again = runner.run("unet", **inputs)
        events = list(server.supervisor.events)
    np.testing.assert_array_equal(first["noise_pred"], again["noise_pred"])
    assert any("fault: model 'unet'" in e for e in events), events
