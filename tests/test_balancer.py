"""Two real Triton replicas behind one TritonRunner: calls spread over both and survive one dying."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from ti2i.benchmarks.settle import settled
from ti2i.client.balancer import BalancedClient
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.errors import InvalidInputError
from ti2i.triton_models.repository import RepositoryOptions, write_repository
from ti2i.triton_models.server import TritonServer, find_free_ports
from tritonclient.utils import InferenceServerException

CALLS = 48  # bounded load, 127.0.0.1 only
THREADS = 4
INPUTS = 6  # distinct inputs, each checked against the in-process engine
KEY = "balancer-test-key"  # the restricted APIs (statistics) of both replicas


@pytest.fixture(scope="module")
def repository(engines, tmp_path_factory):
    # one ORT thread per replica: two replicas on two cores do not steal each other's cores
    return write_repository(engines, tmp_path_factory.mktemp("balanced") / "repository", RepositoryOptions(threads=1),
                            models=["unet"])


def _start_pair(repository, folder):
    servers = [TritonServer(repository, log_path=folder / f"replica{i}.log", api_key=KEY) for i in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def replicas(repository, tmp_path_factory):
    """Two replicas kept running for the module's tests (they compare statistics before and after)."""
    yield from _start_pair(repository, tmp_path_factory.mktemp("replicas"))


@pytest.fixture()
def doomed_replicas(repository, tmp_path):
    """Two replicas of which the test kills one."""
    yield from _start_pair(repository, tmp_path)


@pytest.fixture(scope="module")
def expected(engines):
    rng = np.random.default_rng(0)
    inputs = [{"sample": rng.standard_normal((1, 4, 6, 8), dtype=np.float32),
               "timestep": np.full((1,), 10.0 * i, np.float32),
               "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)} for i in range(INPUTS)]
    with InProcessRunner(engines.root) as runner:
        return [(x, runner.run("unet", **x)["noise_pred"]) for x in inputs]


def _urls(servers):
    return ",".join(f"grpc://{s.grpc_url}" for s in servers)


def _served_count(server) -> int:
    """UNet calls the server has counted, once settled: Triton counts a call after its reply."""
    def read() -> int:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            stats = client.get_inference_statistics("unet", headers=server.api_headers, as_json=True)["model_stats"]
        return int(stats[0]["inference_stats"]["success"].get("count", 0))
    return settled(read)


def _call(runner, expected, i):
    inputs, want = expected[i % INPUTS]
    got = runner.run("unet", **inputs)["noise_pred"]
    assert np.allclose(got, want, atol=1e-5), i
    return i


def test_load_spreads_over_both_replicas(replicas, expected):
    before = [_served_count(s) for s in replicas]
    with TritonRunner(_urls(replicas)) as runner:
        with ThreadPoolExecutor(THREADS) as pool:
            done = list(pool.map(lambda i: _call(runner, expected, i), range(CALLS)))
        for i in range(INPUTS):  # one call at a time alternates
            _call(runner, expected, i)
    assert done == list(range(CALLS))
    counts = [_served_count(s) - b for s, b in zip(replicas, before)]  # the servers' own statistics
    assert sum(counts) == CALLS + INPUTS
    # Least outstanding requests sends more to the faster replica: with a soak on the same 2 cores the split was
    # 9/45, so no proportion is asserted. Both must serve concurrent calls beyond their share of the
    # sequential ones (ties rotate, so those alternate: INPUTS // 2 each).
    assert min(counts) > INPUTS // 2, counts


def test_killing_a_replica_mid_run_loses_no_request_and_is_reported_once(doomed_replicas, expected, caplog):
    replicas = doomed_replicas
    caplog.set_level(logging.WARNING, logger="ti2i.balancer")
    victim = replicas[1]
    halfway = threading.Event()
    finished = []
    lock = threading.Lock()

    def call(i):
        _call(runner, expected, i)
        with lock:
            finished.append(i)
            if len(finished) == CALLS // 3:
                halfway.set()
        return i

    with TritonRunner(_urls(replicas)) as runner:
        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(call, i) for i in range(CALLS)]
            assert halfway.wait(120)
            os.killpg(victim.pid, signal.SIGKILL)  # the server and its python-backend stubs, no goodbye
            results = [f.result(timeout=120) for f in futures]  # none raised
        by_url = {r.url: r for r in runner.client.replicas}
    assert sorted(results) == list(range(CALLS))
    assert by_url[f"grpc://{victim.grpc_url}"].completed > 0 and not by_url[f"grpc://{victim.grpc_url}"].healthy
    reports = [r.getMessage() for r in caplog.records if "failed its health check" in r.getMessage()]
    assert len(reports) == 1 and victim.grpc_url in reports[0] and "\n" not in reports[0], reports


def test_a_component_call_is_retried_once_a_whole_method_request_is_not(replicas, expected):
    alive = replicas[0]
    dead_url, alive_url = f"grpc://127.0.0.1:{find_free_ports(1)[0]}", f"grpc://{alive.grpc_url}"  # nothing listens
    connect = lambda url: grpcclient.InferenceServerClient(url.removeprefix("grpc://"))  # noqa: E731
    inputs, want = expected[0]
    tensors = []
    for name, value in inputs.items():
        value = value.reshape(-1, 1) if name == "timestep" else value
        tensors.append(grpcclient.InferInput(name, list(value.shape), "FP32"))
        tensors[-1].set_data_from_numpy(value)
    before = _served_count(alive)
    client = BalancedClient([dead_url, alive_url], connect)  # not yet health-checked: the first call picks `dead`
    assert np.allclose(client.infer("unet", tensors).as_numpy("noise_pred"), want, atol=1e-5)
    assert _served_count(alive) == before + 1
    client = BalancedClient([dead_url, alive_url], connect)
    with pytest.raises(InferenceServerException, match="whole-method request is not retried"):
        client.infer("sd.txt2img", tensors)  # named after a method: it may have started, so it is not resent
    assert _served_count(alive) == before + 1
    with pytest.raises(InvalidInputError, match="mix protocols"):
        TritonRunner(f"{alive_url},http://{alive.http_url}")


def test_over_http_a_replica_down_at_start_is_left_out(replicas, expected, caplog):
    caplog.set_level(logging.WARNING, logger="ti2i.balancer")
    dead_url = f"http://127.0.0.1:{find_free_ports(1)[0]}"
    with TritonRunner(f"{dead_url},http://{replicas[0].http_url}") as runner:
        for i in range(3):
            _call(runner, expected, i)
    reports = [r.getMessage() for r in caplog.records if "failed its health check" in r.getMessage()]
    assert len(reports) == 1 and dead_url in reports[0]


def test_a_grpc_target_of_several_servers_is_balanced_per_call_by_grpc(replicas, expected):
    """`grpc://dns:///NAME:PORT` (a headless Service) or `grpc://ipv4:A:P,B:Q`: gRPC's round robin over all of them."""
    target = "grpc://ipv4:" + ",".join(s.grpc_url for s in replicas)
    before = [_served_count(s) for s in replicas]
    with TritonRunner(target) as runner:
        for i in range(2 * INPUTS):
            _call(runner, expected, i)
    counts = [_served_count(s) - b for s, b in zip(replicas, before)]
    assert sum(counts) == 2 * INPUTS and min(counts) >= 2, counts
    with TritonRunner(f"grpc://dns:///{replicas[0].grpc_url}") as runner:  # the resolver form, one address here
        _call(runner, expected, 0)
