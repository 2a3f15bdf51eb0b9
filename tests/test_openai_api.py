"""The OpenAI-compatible API of `ti2i serve`, driven by the official `openai` package and by curl.

One real `ti2i serve` serves an SD family and an SVD family; `/v1` on its HTTP port answers the Images and
Videos APIs. Each edit and generation equals the CLI's (`run_remote`) result for the same seed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import openai
import pytest
from PIL import Image
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.triton_models.server import find_free_ports

pytestmark = pytest.mark.timeout(600)

KEY = "unused"  # the server asks for none; the SDK wants one
REPO = Path(__file__).resolve().parent.parent
SMALL = {"height": 32, "width": 32}


@pytest.fixture(scope="module")
def served(engines, svd_engines, tmp_path_factory):
    """`ti2i serve --engines sd=… --engines svd=…`: (HTTP port, gRPC URL, Triton's log)."""
    root = tmp_path_factory.mktemp("openai")
    grpc_port, http_port, metrics_port = find_free_ports(3)
    log = root / "serve.out"
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ti2i.client.cli", "serve", "--engines", f"sd={engines.root}", "--engines",
             f"svd={svd_engines.root}", "--methods", "txt2img,sdedit,pix2pix,inpaint,svd,videoldm", "--repository",
             str(root / "repo"), "--log", str(root / "triton.log"), "--grpc-port", str(grpc_port), "--http-port",
             str(http_port), "--metrics-port", str(metrics_port)],
            stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail(f"not ready:\n{log.read_text()}")
        yield http_port, f"grpc://127.0.0.1:{grpc_port}", root / "triton.log"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture()
def client(served):
    with openai.OpenAI(base_url=f"http://127.0.0.1:{served[0]}/v1", api_key=KEY, max_retries=0,
                       timeout=300) as c:
        yield c


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _ready(http_port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=10) as response:
        return response.status == 200


def test_models_lists_the_served_methods(client):
    ids = {m.id for m in client.models.list()}
    assert {"txt2img", "sdedit", "pix2pix", "inpaint", "svd", "sd.sdedit", "svd.svd"} <= ids
    assert not any(i.endswith("_stream") or i.endswith("core") for i in ids)


def test_generate_equals_the_clis_result(client, served):
    extra = {"steps": 3, "seed": 3, "guidance": 7.5}
    got = client.images.generate(model="txt2img", prompt="hills at dusk", size="32x32", extra_body=extra)
    expected = run_remote(served[1], METHODS["txt2img"], progress=False, stream=False, family="sd",
                          prompt="hills at dusk", **SMALL, **extra)
    assert got.data[0].b64_json and got.size == "32x32"
    np.testing.assert_array_equal(_pixels(got.data[0].b64_json), np.asarray(expected.image))


@pytest.mark.parametrize("method", ["sdedit", "pix2pix", "inpaint"])
def test_edit_equals_the_clis_result(method, client, served, example_image):
    extra = {"steps": 3, "seed": 7}
    files = {"image": ("in.png", _png(example_image), "image/png")}
    values = {"image": example_image}
    if method == "inpaint":
        mask = centered_ellipse_mask(example_image.size)
        files["mask"] = ("mask.png", _png(mask), "image/png")
        values["mask"] = mask
    got = client.images.edit(model=method, prompt="make it snowy", **files, extra_body=extra)
    expected = run_remote(served[1], METHODS[method], progress=False, stream=False, family="sd",
                          prompt="make it snowy", **values, **extra)
    np.testing.assert_array_equal(_pixels(got.data[0].b64_json), np.asarray(expected.image))


def test_n_images_take_consecutive_seeds_and_other_formats(client, served, example_image):
    got = client.images.edit(model="sd.sdedit", prompt="a house", image=("in.png", _png(example_image)), n=2,
                             output_format="webp", extra_body={"steps": 2, "seed": 40, "strength": 0.5})
    assert len(got.data) == 2 and got.output_format == "webp"
    for i, item in enumerate(got.data):
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.format == "WEBP" and image.size == example_image.size
        expected = run_remote(served[1], METHODS["sdedit"], progress=False, stream=False, family="sd",
                              prompt="a house", image=example_image, steps=2, seed=40 + i, strength=0.5)
        assert np.abs(np.asarray(image.convert("RGB"), float) - np.asarray(expected.image, float)).mean() < 8


def test_a_streamed_edit_sends_partial_images_then_the_completed_one(client, example_image):
    events = list(client.images.edit(model="sdedit", prompt="a house", image=("in.png", _png(example_image)),
                                     stream=True, partial_images=2, extra_body={"steps": 6, "seed": 1,
                                                                                "strength": 1.0}))
    kinds = [e.type for e in events]
    assert kinds[-1] == "image_edit.completed" and kinds.count("image_edit.partial_image") == 2, kinds
    assert [e.partial_image_index for e in events[:-1]] == [0, 1]
    assert _pixels(events[-1].b64_json).shape == (48, 64, 3)


def test_a_video_job_is_created_polled_and_downloaded(client, example_image, tmp_path):
    video = client.videos.create_and_poll(model="svd", prompt="", input_reference=("in.png", _png(example_image)),
                                          size="32x32", extra_body={"frames": 2, "steps": 2, "seed": 1},
                                          poll_interval_ms=200)
    assert video.status == "completed", video.error
    mp4 = tmp_path / "video.mp4"
    mp4.write_bytes(client.videos.download_content(video.id).read())
    frames = iio.imread(mp4, index=None)
    assert frames.shape[0] == 2 and frames.shape[1:3] == (32, 32)
    assert client.videos.delete(video.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_a_videoldm_job_takes_its_prompt_and_the_methods_options(client, example_image, tmp_path):
    video = client.videos.create_and_poll(model="videoldm", prompt="clouds drifting", size="32x32",
                                          input_reference=("in.png", _png(example_image)), poll_interval_ms=200,
                                          extra_body={"frames": 2, "steps": 3, "strength": 0.5, "seed": 6})
    assert video.status == "completed", video.error
    mp4 = tmp_path / "video.mp4"
    mp4.write_bytes(client.videos.download_content(video.id).read())
    assert iio.imread(mp4, index=None).shape[:3] == (2, 32, 32)
    failed = client.videos.create_and_poll(model="videoldm", prompt="x", poll_interval_ms=200,
                                           input_reference=("in.png", _png(example_image)),
                                           extra_body={"frames": 2, "steps": 100000})
    assert failed.status == "failed" and "steps" in failed.error.message


def test_bad_requests_are_openai_errors_and_the_server_stays_ready(client, served):
    with pytest.raises(openai.BadRequestError, match="image"):
        client.images.edit(model="sdedit", prompt="x", image=("in.png", b"not an image at all"))
    with pytest.raises(openai.BadRequestError, match="steps"):
        client.images.generate(model="txt2img", prompt="x", extra_body={"steps": 100000})
    with pytest.raises(openai.BadRequestError, match="no input"):
        client.images.generate(model="txt2img", prompt="x", extra_body={"colour": "red"})
    with pytest.raises(openai.NotFoundError, match="dall-e-3"):
        client.images.generate(model="dall-e-3", prompt="x")
    with pytest.raises(openai.BadRequestError, match="videos endpoint"):
        client.images.generate(model="svd", prompt="x")
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(f"http://127.0.0.1:{served[0]}/v1/images/variations/none", timeout=10)
    assert unknown.value.code == 404 and json.loads(unknown.value.read())["error"]["message"] == "Not Found"
    assert _ready(served[0])


@contextlib.contextmanager
def _running(serve: Callable[[asyncio.Event], Awaitable[None]]) -> Iterator[None]:
    """Run `serve(started)` on its own loop in a thread until the block ends, then stop it the way the guard
    stops (cancelled) and close the loop: nothing of it is left for the garbage collector to finish later, in
    the middle of another test."""
    loop = asyncio.new_event_loop()
    started = asyncio.Event()
    task = loop.create_task(serve(started))

    def run() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(task)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not started.is_set() and not task.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.is_set(), "the server did not start"
    try:
        yield
    finally:
        loop.call_soon_threadsafe(task.cancel)
        thread.join(30)
        assert not thread.is_alive(), "the server did not stop"
        assert not asyncio.all_tasks(loop), "the server left tasks running"
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_with_a_key_every_request_must_send_it(tmp_path):
    from ti2i.triton_models.openai_api import create_app, serve

    port, = find_free_ports(1)
    app = create_app(tmp_path, "127.0.0.1:1", api_key="sk-right")
    with _running(lambda started: serve(app, port, started)):
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0) as c:
            with pytest.raises(openai.AuthenticationError, match="API key"):
                c.models.list()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert refused.value.code == 401 and json.loads(refused.value.read())["error"]["type"] == "authentication_error"
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-right", max_retries=0) as c:
            assert list(c.models.list()) == []


def _readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(language + "\n")]


def test_the_readmes_served_examples_run(served, tmp_path):
    """The README's curl commands and OpenAI example, as written, against this server (its port for 8000)."""
    if subprocess.run(["which", "jq"], capture_output=True).returncode:
        pytest.skip("the README's curl examples pipe through jq, which this machine lacks")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    commands = [block for block in _readme_blocks("sh") if block.startswith("curl")]
    assert len(commands) >= 2
    for command in commands:
        # this server serves two families: its KServe name of the README's one-family sdedit is sd.sdedit
        command = command.replace("127.0.0.1:8000", f"127.0.0.1:{served[0]}").replace("/models/sdedit/",
                                                                                    "/models/sd.sdedit/")
        subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=tmp_path, check=True, timeout=300)
        assert Image.open(tmp_path / "edit.png").size == Image.open(REPO / "examples" / "input.png").size
        (tmp_path / "edit.png").unlink()
    example, = _readme_blocks("python")
    check = "\nassert edit.data[0].b64_json and video.status == 'completed', video\n"
    subprocess.run([sys.executable, "-c", example.replace("127.0.0.1:8000", f"127.0.0.1:{served[0]}") + check],
                   cwd=tmp_path, check=True, timeout=300)


def test_curl_multipart_edit(served, example_image, tmp_path):
    image = tmp_path / "in.png"
    example_image.save(image)
    out = subprocess.run(["curl", "-sS", "--max-time", "300", f"http://127.0.0.1:{served[0]}/v1/images/edits",
                          "-H", f"Authorization: Bearer {KEY}", "-F", "model=sdedit", "-F", "prompt=a house",
                          "-F", f"image=@{image}", "-F", "steps=2", "-F", "seed=5", "-F", "strength=0.5"],
                         capture_output=True, check=True, timeout=320).stdout
    body = json.loads(out)
    expected = run_remote(served[1], METHODS["sdedit"], progress=False, stream=False, family="sd",
                          prompt="a house", image=example_image, steps=2, seed=5, strength=0.5)
    np.testing.assert_array_equal(_pixels(body["data"][0]["b64_json"]), np.asarray(expected.image))


def test_the_guard_lets_go_of_a_connection_that_sends_no_request_head():
    """Original failure: a client that opened a connection and sent half a request head (or nothing) held it,
    and a guard task, for good: enough of them exhaust the machine."""
    from ti2i.triton_models.http_guard import HttpGuard

    port, upstream = find_free_ports(2)
    guard = HttpGuard(("127.0.0.1", port), ("127.0.0.1", upstream), head_timeout_s=1.0)
    with _running(guard.serve):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
            start = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the guard
            assert time.monotonic() - start < 5


def test_a_client_that_hangs_up_cancels_its_request(served, example_image):
    """A /v1 client that leaves stops its loop (the guard closes the API's connection; the API cancels its
    call to Triton, and the core its loop) instead of leaving 999 steps running for nobody."""
    body = json.dumps({"model": "sdedit", "prompt": "a house", "image": base64.b64encode(_png(example_image)).decode(),
                       "steps": 999, "strength": 1.0, "seed": 2}).encode()
    with socket.create_connection(("127.0.0.1", served[0]), timeout=10) as leaving:
        leaving.sendall(f"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: "
                        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "sdedit: cancelled at" not in served[2].read_text(errors="replace"):
        time.sleep(0.2)
    assert "sdedit: cancelled at" in served[2].read_text(errors="replace")
    assert _ready(served[0])
