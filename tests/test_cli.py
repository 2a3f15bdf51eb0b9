"""The `ti2i` command line, happy path: tiny → export → sdedit (in-process and through Triton) → repository → serve."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE
from PIL import Image
from ti2i.client.cli import main
from ti2i.triton_models.repository import parse_config
from ti2i.triton_models.server import find_free_ports

from ti2i.manifest import Manifest

pytestmark = pytest.mark.timeout(300)

COMPONENTS = {"text_encoder", "vae_encoder", "vae_decoder", "unet", "tokenize", "image_preprocess",
              "image_postprocess"}
ENSEMBLES = {"encode_prompt", "encode_image", "decode_image"}
STAGES = ("encode_prompt", "encode_image", "unet", "decode_image")


@pytest.fixture(scope="module")
def cli_engines(tmp_path_factory) -> Path:
    """`ti2i tiny` then `ti2i export`, in-process."""
    root = tmp_path_factory.mktemp("cli")
    model, engines = root / "tiny_sd", root / "engines"
    assert main(["tiny", "--kind", "sd", "--out", str(model)]) == 0
    assert (model / "model_index.json").is_file()
    assert main(["export", "--model", str(model), "--out", str(engines)]) == 0
    return engines


def _sdedit(target: list[str], out: Path, *extra: str) -> list[str]:
    return ["sdedit", *target, "--image", str(EXAMPLE), "--prompt", "a watercolor of a house", "--seed", "11",
            "--steps", "4", "--strength", "0.5", "--out", str(out), *extra]


def test_tiny_and_export_write_an_engine_directory(cli_engines, capsys):
    manifest = Manifest.load(cli_engines)
    assert COMPONENTS <= set(manifest.components)
    for name, entry in manifest.components.items():
        if entry.file is not None:
            assert manifest.path_of(name).is_file(), name


def test_sdedit_in_process_writes_the_image_and_a_timing_table(cli_engines, tmp_path, capsys):
    out = tmp_path / "sub" / "x.png"
    assert main(_sdedit(["--engines", str(cli_engines)], out, "--height", "64", "--width", "64")) == 0
    captured = capsys.readouterr()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    lines = captured.out.splitlines()
    assert lines[0].split() == ["stage", "calls", "total", "ms", "median", "ms"]
    table = {line.split()[0]: line.split()[1:] for line in lines[1:-1]}
    assert set(STAGES) <= set(table), captured.out
    assert int(table["unet"][0]) >= 2  # 4 steps × strength 0.5 (PNDM repeats one timestep)
    assert all(float(v) >= 0 for row in table.values() for v in row[1:])
    assert lines[-1] == f"wrote {out}"
    # --quiet: no timing table, no progress bar
    assert main(_sdedit(["--engines", str(cli_engines)], tmp_path / "q.jpg", "--height", "64", "--width", "64",
                        "--quiet")) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"wrote {tmp_path / 'q.jpg'}" and "sdedit" not in captured.err
    with Image.open(tmp_path / "q.jpg") as image:
        assert image.format == "JPEG" and image.size == (64, 64)


@pytest.fixture(scope="module")
def in_process_png(sd_engines, tmp_path_factory) -> np.ndarray:
    """The reference output for the served runs: the engines the session's server serves, in-process."""
    out = tmp_path_factory.mktemp("in_process") / "local.png"
    assert main(_sdedit(["--engines", str(sd_engines.root)], out, "--height", "48", "--width", "64",
                        "--quiet")) == 0
    return np.asarray(Image.open(out))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sdedit_through_the_server_matches_in_process(protocol, triton_server, in_process_png, tmp_path, capsys):
    address = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    out = tmp_path / f"{protocol}.png"
    assert main(_sdedit(["--server", f"{protocol}://{address}"], out, "--height", "48", "--width", "64")) == 0
    captured = capsys.readouterr()
    assert all(stage in captured.out for stage in STAGES) and f"wrote {out}" in captured.out
    served = np.asarray(Image.open(out))
    assert served.shape == in_process_png.shape == (48, 64, 3)
    np.testing.assert_array_equal(served, in_process_png)


def test_repository_writes_the_core_and_its_entry_points(cli_engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["repository", "--engines", str(cli_engines), "--out", str(repo), "--active", "3",
                 "--max-queue-size", "5", "--queue-timeout-s", "7", "--threads", "1", "--max-steps", "50"]) == 0
    assert f"wrote {repo.resolve()}" in capsys.readouterr().out
    configs = {p.parent.name: parse_config(p) for p in repo.glob("*/config.pbtxt")}
    methods = {"txt2img", "sdedit", "cyclediffusion", "ddib"}  # those a plain SD engine directory serves
    assert set(configs) == COMPONENTS | ENSEMBLES | methods | {f"{m}_stream" for m in methods} | {"core"}
    sdedit = configs["sdedit"]
    assert [i.name for i in sdedit.input] == ["image", "control_image", "prompt", "negative_prompt", "strength",
                                              "steps", "guidance", "seed", "height", "width", "scheduler", "lora",
                                              "controlnet", "control_scale", "control_start", "control_end",
                                              "original_height", "original_width", "crop_top", "crop_left", "format"]
    assert all(i.optional for i in sdedit.input)
    assert {o.name for o in sdedit.output} == {"encoded", "encoded_base64", "pixels"}
    assert configs["sdedit_stream"].model_transaction_policy.decoupled and not sdedit.model_transaction_policy.decoupled
    for name in [*COMPONENTS, *methods]:  # entry points: no engines, no Triton queue, forwarding to the core
        assert configs[name].backend == "python" and (repo / name / "1" / "model.py").is_file()
        assert configs[name].parameters["core"].string_value == "core"
        assert not configs[name].HasField("dynamic_batching"), name
    core = configs["core"]
    assert core.model_transaction_policy.decoupled and core.instance_group[0].count == 1
    options = json.loads(core.parameters["options"].string_value)
    assert (options["active"], options["max_queue"], options["queue_timeout_s"], options["threads"],
            options["limits"]["max_steps"]) == (3, 5, 7.0, 1, 50)
    assert set(json.loads(core.parameters["methods"].string_value)) == methods
    for name in ENSEMBLES:
        assert configs[name].platform == "ensemble"
    for flags, error in ((["--max-queue-size", "-1"], "--max-queue-size must be >= 0"),
                         (["--active", "0"], "active must be ≥ 1")):
        assert main(["repository", "--engines", str(cli_engines), "--out", str(tmp_path / "bad"), *flags]) == 2
        assert error in capsys.readouterr().err, flags


def _wait_ready(proc: subprocess.Popen, port: int, log: Path, timeout_s: float = 120) -> None:
    url = f"http://127.0.0.1:{port}/v2/health/ready"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`ti2i serve` exited with {proc.returncode} before ready:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    pytest.fail(f"`ti2i serve` was not ready after {timeout_s} s:\n{log.read_text()}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_serves_and_stops_on_signal(sig, cli_engines, tmp_path, capsys):
    grpc_port, http_port, metrics_port = find_free_ports(3)
    stdout = tmp_path / "serve.out"
    with open(stdout, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ti2i.client.cli", "serve", "--engines", str(cli_engines),
             "--repository", str(tmp_path / "repo"), "--log", str(tmp_path / "triton.log"),
             "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port)],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_ready(proc, http_port, stdout)
        out = tmp_path / "served.png"
        url = f"grpc://127.0.0.1:{grpc_port}" if sig == signal.SIGTERM else f"http://127.0.0.1:{http_port}"
        assert main(_sdedit(["--server", url], out, "--height", "48", "--width", "64", "--quiet")) == 0
        assert Image.open(out).size == (64, 48)
        text = stdout.read_text()
        assert f"gRPC    127.0.0.1:{grpc_port}" in text and f"HTTP    http://127.0.0.1:{http_port}" in text
        server_pid = int(text.split("Triton server ready (pid ", 1)[1].split(",", 1)[0])
        assert _alive(server_pid)

        start = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0, stdout.read_text()
        assert time.monotonic() - start < 30
        assert f"Stopping Triton server ({sig.name})" in stdout.read_text()
        assert not _alive(server_pid)
        with pytest.raises((urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_every_flag_has_help_and_shows_its_default(capsys):
    import argparse

    from ti2i.app.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings) for name, command in sub.choices.items() for a in command._actions
               if a.option_strings and not a.help]
    assert missing == []
    with pytest.raises(SystemExit):
        main(["sdedit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 50)" in text and "(default: 0.8; on SDXL models 0.3" in text  # steps; strength by model
    assert "(default: 7.5; on SDXL models 5" in text and "(default: None)" not in text


def test_serve_on_a_busy_port_is_one_line(cli_engines, tmp_path, capsys):
    """Triton printed 48 lines of its log and exited; now the flag to change is named before anything starts."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--engines", str(cli_engines), "--repository", str(tmp_path / "repo"),
                     "--grpc-port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ti2i serve: error: port {port} on 127.0.0.1 is in use: choose another with --grpc-port"]
    assert not (tmp_path / "repo").exists()
