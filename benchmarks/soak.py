"""Soak: N clients of mixed methods, bad requests mixed in, against one supervised server for M minutes.

    ti2i bench --soak MINUTES --clients N --out DIR [--preset tiny]

Each client loops over a fixed mix until the time is up: SDEdit, text-to-image, InstructPix2Pix
and CycleDiffusion (a few steps each, over gRPC and HTTP in turn), and every fourth job a bad request
drawn from what operators saw crash or confuse the server: a wrong dtype, a wrong rank, an
unknown model, an 8 MB form-encoded body, a body over the HTTP limit, a shared-memory
registration without the key. A bad request must get its refusal (an expected failure); anything
else is an unexpected failure. Every ``sample_s`` the server's resident memory (tritonserver, its
python-backend stubs and the HTTP guard) is sampled. Writes ``soak.json`` and ``soak.md`` to the
results folder and returns the report.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ti2i.benchmarks import machine
from ti2i.benchmarks.presets import default_cache_dir, engine_dir, get_preset
from ti2i.errors import InvalidInputError, ModelNotFoundError, ServerUnavailableError

KINDS = ["sd", "pix2pix"]
METHODS = ("sdedit", "txt2img", "pix2pix", "cyclediffusion")
BAD = ("wrong_dtype", "wrong_rank", "unknown_model", "form_body_8mb", "body_over_limit", "shm_without_key")
STEPS = 4
SIZE = (64, 48)  # width, height: the tiny models' test size


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _server_pids(server: Any) -> list[int]:
    from ti2i.triton_models.supervisor import stub_processes

    pids = [server.pid] if server.pid else []
    pids += [pid for pid, _ in stub_processes(server.pid).values()] if server.pid else []
    if server._guard is not None:
        pids.append(server._guard.pid)
    return pids


def _method_job(method: str, image: Image.Image) -> Callable[[Any], Any]:
    def run(runner: Any) -> Any:
        if method == "sdedit":
            from ti2i.client.sdedit import sdedit

            return sdedit(runner, image, "a cat", steps=STEPS, progress=False)
        if method == "txt2img":
            from ti2i.client.txt2img import txt2img

            return txt2img(runner, "a cat", steps=STEPS, height=SIZE[1], width=SIZE[0], progress=False)
        if method == "pix2pix":
            from ti2i.client.pix2pix import pix2pix

            return pix2pix(runner, image, "make it snow", steps=STEPS, progress=False)
        from ti2i.client.cyclediffusion import cyclediffusion

        return cyclediffusion(runner, image, "a dog", "a cat", steps=STEPS, progress=False)

    return run


def _raw_post(address: str, body_len: int, content_type: str) -> int:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v2/models/unet/infer HTTP/1.1\r\nHost: {address}\r\nContent-Type: {content_type}\r\n"
                  f"Content-Length: {body_len}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode())
        reply = s.recv(64)
        if reply.startswith(b"HTTP/1.1 100"):
            s.sendall(b"\0" * body_len)
            reply = s.recv(64)
    return int(reply.split()[1]) if reply.startswith(b"HTTP/") else 0


def _bad_job(kind: str, server: Any) -> None:
    """Send one bad request; return when it got the refusal it should; raise otherwise."""
    from ti2i.client.runners import TritonRunner

    if kind in ("form_body_8mb", "body_over_limit"):
        n = 8_000_000 if kind == "form_body_8mb" else server.max_http_body_bytes + 1
        ctype = "application/x-www-form-urlencoded" if kind == "form_body_8mb" else "application/octet-stream"
        status = _raw_post(server.http_url, n, ctype)
        if status not in ((400, 500) if kind == "form_body_8mb" else (413,)):
            raise RuntimeError(f"{kind}: got HTTP {status}")
        return
    if kind == "shm_without_key":
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            client.register_system_shared_memory("ti2i_soak", "/ti2i_soak_absent", 64)
        except InferenceServerException as err:
            if "restricted" in str(err):
                return
            raise
        finally:
            client.close()
        raise RuntimeError("shared-memory registration without the key was accepted")
    with TritonRunner(f"grpc://{server.grpc_url}") as runner:
        sample = np.zeros((2, 4, 6, 8), np.float32)
        inputs = dict(sample=sample, timestep=np.array([10.0, 10.0], np.float32),
                      encoder_hidden_states=np.zeros((2, 77, 32), np.float32))
        try:
            if kind == "wrong_dtype":
                runner.run("unet", **{**inputs, "sample": sample.astype(np.float64)})
            elif kind == "wrong_rank":
                runner.run("unet", **{**inputs, "sample": sample[0]})
            else:
                runner.run("no_such_model", x=sample)
        except (InvalidInputError, ModelNotFoundError):
            return
    raise RuntimeError(f"{kind}: the server accepted it")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [50, 90, 99])
    return {"n": len(values), "p50_s": float(q[0]), "p90_s": float(q[1]), "p99_s": float(q[2]),
            "max_s": float(max(values))}


def run_soak(minutes: float, clients: int, out: Path, preset: str = "tiny", cache: Path | None = None,
             sample_s: float = 10.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak; write ``soak.json``/``soak.md`` under ``out``; return the report."""
    from ti2i.client.runners import TritonRunner
    from ti2i.manifest import Manifest
    from ti2i.triton_models.repository import write_repository
    from ti2i.triton_models.server import TritonServer

    if minutes <= 0 or clients < 1:
        raise InvalidInputError(f"--soak needs minutes > 0 and --clients ≥ 1 (got {minutes}, {clients})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    engines = engine_dir(get_preset(preset), KINDS, Path(cache or default_cache_dir()).expanduser(), log)
    image = Image.open(Path(__file__).resolve().parents[1] / "examples" / "input.png").convert("RGB").resize(SIZE)
    outcomes: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    unexpected: list[str] = []
    rss: list[tuple[float, int]] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="ti2i-soak-") as tmp:
        repo = write_repository(Manifest.load(engines), Path(tmp) / "repository")
        with TritonServer(repo, log_path=out / "soak-server.log", supervise=True, startup_timeout_s=900) as server:
            t0 = time.monotonic()
            deadline = t0 + minutes * 60
            log(f"soak: {clients} clients for {minutes:g} min against {server.grpc_url} / {server.http_url}")

            def client(index: int) -> None:
                jobs = itertools.cycle([*METHODS, None])
                bad = itertools.cycle(BAD[index % len(BAD):] + BAD[:index % len(BAD)])
                runners = {p: None for p in ("grpc", "http")}
                protocols = itertools.cycle(["grpc", "http"] if index % 2 == 0 else ["http", "grpc"])
                try:
                    while time.monotonic() < deadline:
                        method = next(jobs)
                        start = time.monotonic()
                        try:
                            if method is None:
                                kind = next(bad)
                                _bad_job(kind, server)
                                label, outcome = f"bad:{kind}", f"refused as expected: {kind}"
                            else:
                                protocol = next(protocols)
                                if runners[protocol] is None:
                                    url = f"{protocol}://{server.grpc_url if protocol == 'grpc' else server.http_url}"
                                    runners[protocol] = TritonRunner(url)
                                _method_job(method, image)(runners[protocol])
                                label, outcome = f"{method}/{protocol}", "ok"
                        except Exception as err:  # anything unexpected is counted, never fatal
                            label = method or "bad"
                            outcome = f"unexpected: {type(err).__name__}"
                            with lock:
                                unexpected.append(f"{time.monotonic() - t0:.0f}s {label}: {type(err).__name__}: "
                                                  f"{str(err).splitlines()[0][:200] if str(err) else ''}")
                            if isinstance(err, ServerUnavailableError):
                                for p, r in runners.items():
                                    if r is not None:
                                        r.close()
                                    runners[p] = None
                        with lock:
                            outcomes[outcome] += 1
                            latencies[label].append(time.monotonic() - start)
                finally:
                    for r in runners.values():
                        if r is not None:
                            r.close()

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                rss.append((time.monotonic() - t0, _rss_bytes(_server_pids(server))))
                with lock:
                    done = sum(outcomes.values())
                log(f"soak: {rss[-1][0]:6.0f} s, {done} requests, {len(unexpected)} unexpected, "
                    f"server RSS {rss[-1][1] / 2**20:.0f} MiB")
                for t in threads:
                    t.join(timeout=sample_s / max(1, len(threads)))
            rss.append((time.monotonic() - t0, _rss_bytes(_server_pids(server))))
            events = list(server.supervisor.events) if server.supervisor else []
    report = _report(minutes, clients, preset, outcomes, latencies, unexpected, rss, events)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    (out / "soak.md").write_text(_markdown(report))
    return report


def _report(minutes, clients, preset, outcomes, latencies, unexpected, rss, events) -> dict[str, Any]:
    warm = [b for t, b in rss if t >= min(60.0, minutes * 60 / 3)] or [b for _, b in rss]
    return {
        "machine": machine.describe_machine(), "minutes": minutes, "clients": clients, "preset": preset,
        "steps": STEPS, "requests": sum(outcomes.values()), "outcomes": dict(outcomes),
        "unexpected_failures": len(unexpected), "unexpected": unexpected[:50],
        "latency": {k: _percentiles(v) for k, v in sorted(latencies.items())},
        "rss_mib": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
        "rss_after_warmup_mib": {"first": round(warm[0] / 2**20, 1), "last": round(warm[-1] / 2**20, 1),
                                 "max": round(max(warm) / 2**20, 1)},
        "supervisor_events": events,
    }


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# Soak: {r['clients']} clients × {r['minutes']:g} min ({r['preset']} preset, {r['steps']} steps)", "",
             f"Machine: {machine.label(r['machine'])}", "",
             f"Requests: {r['requests']}; unexpected failures: {r['unexpected_failures']}", "",
             "| outcome | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(r["outcomes"].items())]
    lines += ["", "| request | n | p50 s | p90 s | p99 s | max s |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['n']} | {v['p50_s']:.3f} | {v['p90_s']:.3f} | {v['p99_s']:.3f} | {v['max_s']:.3f} |"
              for k, v in r["latency"].items() if v]
    w = r["rss_after_warmup_mib"]
    lines += ["", f"Server RSS after warm-up (MiB): first {w['first']}, last {w['last']}, max {w['max']}",
              "", "RSS over time (s, MiB): " + ", ".join(f"{t:.0f}: {m:.0f}" for t, m in r["rss_mib"])]
    if r["unexpected"]:
        lines += ["", "Unexpected failures (first 50):", *[f"- {u}" for u in r["unexpected"]]]
    if r["supervisor_events"]:
        lines += ["", "Supervisor:", *[f"- {e}" for e in r["supervisor_events"]]]
    return "\n".join(lines) + "\n"
