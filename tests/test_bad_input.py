"""Bad input gets one clear message naming the problem, at every layer; good input in odd colour modes is converted.

* Python API: a typed `ti2i.errors` exception (`InvalidInputError`, `ModelNotFoundError`, `ServerUnavailableError`).
* CLI: exit code 2 and exactly one line on stderr, ``ti2i sdedit: error: ...`` (no traceback).
* Triton: INVALID_ARG naming the tensor (gRPC ``StatusCode.INVALID_ARGUMENT``, HTTP ``400``); the server stays up.
* Engines: a wrong name, dtype, rank or a dimension out of range names the tensor, what was expected and what came.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import EXAMPLE, server_url
from PIL import Image
from ti2i.client import cli
from ti2i.client.images import load_image
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.client.sdedit import sdedit

from ti2i.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ServerUnavailableError,
    Ti2iError,
)

pytestmark = pytest.mark.timeout(300)

UNREACHABLE = ("grpc://127.0.0.1:1", "http://127.0.0.1:1")  # nothing listens on port 1


# --------------------------------------------------------------------------- helpers and fixtures


@pytest.fixture(scope="module")
def runner(sd_engines):
    with InProcessRunner(sd_engines.root) as r:
        yield r


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_files")
    text = root / "x.png"
    text.write_text("this is not an image\n")
    empty = root / "empty.png"
    empty.write_bytes(b"")
    return {"missing": root / "nope.png", "text": text, "empty": empty}


def fast(**overrides):
    """sdedit keyword arguments for one cheap denoising step (with guidance)."""
    return {"steps": 2, "strength": 0.5, "progress": False, **overrides}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width×height RGB but that carries no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_says(err: BaseException, *words: str) -> None:
    message = str(err)
    assert "\n" not in message.strip(), f"one line expected: {message!r}"
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


# --------------------------------------------------------------------------- Python API


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, math.nan])
def test_strength_outside_0_1(runner, example_image, strength):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(strength=strength))
    assert_says(info.value, "strength", "(0")


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one_or_fractional(runner, example_image, steps):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(steps=steps))
    assert_says(info.value, "steps", str(steps))


def test_strength_times_steps_below_one_runs_nothing(runner, example_image):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(steps=1, strength=0.5))
    assert_says(info.value, "strength", "steps")


@pytest.mark.parametrize("label, size", [("height", dict(height=-8)), ("height", dict(height=0)),
                                         ("width", dict(width=0)), ("width", dict(width=-64))])
def test_height_width_not_positive(runner, example_image, label, size):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(**size))
    assert_says(info.value, label, "positive")


def test_size_below_one_latent_pixel(runner, example_image):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(height=4))
    assert_says(info.value, "smaller than one latent pixel")


@pytest.mark.parametrize("size", [(0, 0), (0, 16), (16, 0)])
def test_zero_size_image(runner, size):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, Image.new("RGB", size), "a cat", **fast())
    assert_says(info.value, "zero size")


def test_image_over_the_pixel_limit(runner, example_image):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(max_pixels=1000))  # 64×48 = 3072 pixels
    assert_says(info.value, "3072 pixels", "limit of 1000")


def test_requested_size_over_the_pixel_limit(runner, example_image):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(max_pixels=10_000, height=256, width=256))
    assert_says(info.value, "256×256", "limit of 10000 pixels")


def test_pixel_limit_from_the_environment(monkeypatch, runner, example_image):
    """TI2I_MAX_PIXELS is read at each call (the default of every method's max_pixels)."""
    from ti2i.client.images import pixel_limit

    monkeypatch.setenv("TI2I_MAX_PIXELS", "1000")
    assert pixel_limit() == 1000
    with pytest.raises(InvalidInputError) as info:
        load_image(example_image)
    assert_says(info.value, "limit of 1000 pixels", "TI2I_MAX_PIXELS")
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", steps=2, strength=0.5, progress=False)
    assert_says(info.value, "limit of 1000 pixels")
    monkeypatch.delenv("TI2I_MAX_PIXELS")
    assert pixel_limit() == 2048 * 2048


@pytest.mark.parametrize("raw", ["abc", "0", "-5"])
def test_a_malformed_pixel_limit_is_a_clear_error(monkeypatch, example_image, raw):
    monkeypatch.setenv("TI2I_MAX_PIXELS", raw)
    with pytest.raises(InvalidInputError) as info:
        load_image(example_image)
    assert_says(info.value, "TI2I_MAX_PIXELS", "positive integer")


@pytest.mark.parametrize("name", ["guidance", "eta"])
def test_non_finite_scales_are_rejected(runner, example_image, name):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, example_image, "a cat", **fast(**{name: float("nan")}))
    assert_says(info.value, name, "finite")


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_header_only(5000, 5000))  # declares 25 Mpx, holds no pixel data
    with pytest.raises(InvalidInputError) as info:
        load_image(path, max_pixels=1_000_000)
    assert_says(info.value, "pixels", "limit of 1000000")


@pytest.mark.parametrize("kind, words", [("missing", ("does not exist",)),
                                         ("text", ("not a readable image",)),
                                         ("empty", ("not a readable image",))])
def test_unreadable_image_files(runner, bad_files, kind, words):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, bad_files[kind], "a cat", **fast())
    assert_says(info.value, str(bad_files[kind].name), *words)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1"])
def test_colour_modes_are_converted_not_rejected(runner, example_image, tmp_path, mode):
    if mode == "P":
        image = example_image.quantize(colors=32)
        image.info["transparency"] = 0
    elif mode == "RGBA":
        image = example_image.convert("RGBA")
        image.putalpha(128)
    else:
        image = example_image.convert(mode)
    assert image.mode == mode
    assert load_image(image).mode == "RGB"
    path = tmp_path / f"input_{mode}.png"
    image.save(path)
    assert Image.open(path).mode == mode
    result = sdedit(runner, path, "a cat", **fast())
    assert result.image.size == (64, 48) and result.image.mode == "RGB"
    assert result.array.shape == (48, 64, 3) and np.isfinite(result.array).all()
    result = sdedit(runner, image, "a cat", **fast(height=40, width=56))
    assert result.image.size == (56, 40)


def test_missing_engine_directory(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        InProcessRunner(tmp_path / "no_engines")
    assert_says(info.value, "no_engines", "does not exist")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, Ti2iError)


def test_engine_directory_without_manifest(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        InProcessRunner(tmp_path)
    assert_says(info.value, "manifest.json")


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', '{"format": 2}'])
def test_engine_directory_with_a_broken_manifest(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ModelNotFoundError) as info:
        InProcessRunner(tmp_path)
    assert_says(info.value, "manifest")


@pytest.mark.parametrize("url", UNREACHABLE)
def test_unreachable_server(url):
    with pytest.raises(ServerUnavailableError) as info:
        TritonRunner(url, timeout_s=10)
    assert_says(info.value, url, "unreachable")
    assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize("url", ["tcp://127.0.0.1:8001", "127.0.0.1:8001", "grpc://", "https://127.0.0.1:8000"])
def test_bad_server_url(url):
    with pytest.raises(InvalidInputError) as info:
        TritonRunner(url)
    assert_says(info.value, repr(url), "grpc://HOST:PORT")


# --------------------------------------------------------------------------- engines: inputs against the declaration


def _unet_inputs(**overrides):
    inputs = {"sample": np.zeros((1, 4, 6, 8), np.float32), "timestep": np.full((1,), 500.0, np.float32),
              "encoder_hidden_states": np.zeros((1, 77, 32), np.float32)}
    inputs.update(overrides)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("inputs, words", [
    (_unet_inputs(sample=None, smple=np.zeros((1, 4, 6, 8), np.float32)), ("unet", "sample", "smple", "missing")),
    (_unet_inputs(sample=np.zeros((1, 4, 6, 8), np.float64)), ("unet.sample", "float32", "float64")),
    (_unet_inputs(sample=np.zeros((1, 4, 6), np.float32)), ("unet.sample", "rank 4", "(1, 4, 6)")),
    (_unet_inputs(sample=np.zeros((1, 3, 6, 8), np.float32)), ("unet.sample", "must be 4", "(1, 3, 6, 8)")),
    (_unet_inputs(sample=np.zeros((1, 4, 300, 8), np.float32)), ("unet.sample", "height", "[1, 256]", "300")),
    (_unet_inputs(encoder_hidden_states=np.zeros((2, 77, 32), np.float32)), ("encoder_hidden_states", "batch")),
    (_unet_inputs(timestep=[500.0]), ("unet.timestep", "numpy array", "list")),
], ids=["name", "dtype", "rank", "fixed-dim", "dim-range", "batch-mismatch", "not-array"])
def test_engine_inputs_checked_against_the_declaration(runner, inputs, words):
    with pytest.raises(InvalidInputError) as info:
        runner.run("unet", **inputs)
    assert_says(info.value, *words)


def test_engine_accepts_a_valid_request(runner):
    out = runner.run("unet", **_unet_inputs())
    assert out["noise_pred"].shape == (1, 4, 6, 8)


def test_unknown_model_in_process(runner):
    with pytest.raises(ModelNotFoundError) as info:
        runner.run("no_such_model")
    assert_says(info.value, "no_such_model")


def test_ensemble_input_name_checked_in_process(runner):
    with pytest.raises(InvalidInputError) as info:
        runner.run("encode_image", img=np.zeros((1, 48, 64, 3), np.uint8))
    assert_says(info.value, "image")


# --------------------------------------------------------------------------- CLI


def _sdedit_argv(engines, image=EXAMPLE, out="out.png", **options) -> list[str]:
    argv = ["sdedit", "--image", str(image), "--prompt", "a cat", "--out", str(out)]
    target = options.pop("server", None)
    argv += ["--server", target] if target else ["--engines", str(engines)]
    for key, value in {"steps": 2, "strength": 0.5, "height": 48, "width": 64, **options}.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _assert_one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr, got:\n{err}"
    assert lines[0].startswith("ti2i sdedit: error: "), lines[0]
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"


CLI_CASES = {
    "missing-image": (dict(image="{tmp}/nope.png"), ("nope.png", "does not exist")),
    "text-file": (dict(image="{text}"), ("x.png", "not a readable image")),
    "empty-file": (dict(image="{empty}"), ("empty.png", "not a readable image")),
    "strength-0": (dict(strength=0), ("strength", "got 0")),
    "strength-1.5": (dict(strength=1.5), ("strength", "got 1.5")),
    "steps-0": (dict(steps=0), ("steps", "got 0")),
    "height-neg": (dict(height=-8), ("height", "positive", "-8")),
    "width-0": (dict(width=0), ("width", "positive")),
    "missing-engines": (dict(engines="{tmp}/no_engines"), ("no_engines", "does not exist")),
    "grpc-unreachable": (dict(server="grpc://127.0.0.1:1"), ("grpc://127.0.0.1:1", "unreachable")),
    "http-unreachable": (dict(server="http://127.0.0.1:1"), ("http://127.0.0.1:1", "unreachable")),
    "bad-scheme": (dict(server="tcp://127.0.0.1:8001"), ("tcp://127.0.0.1:8001", "grpc://HOST:PORT")),
    "out-extension": (dict(out="{tmp}/out.xyz"), ("out.xyz", "extension")),
}


def _resolve(case: str, sd_engines, bad_files, tmp_path) -> list[str]:
    options, _ = CLI_CASES[case]
    values = {"tmp": tmp_path, "text": bad_files["text"], "empty": bad_files["empty"]}
    options = {k: (v.format(**values) if isinstance(v, str) else v) for k, v in options.items()}
    engines = options.pop("engines", sd_engines.root)
    options.setdefault("out", tmp_path / "out.png")
    return _sdedit_argv(engines, **options)


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_in_process(case, sd_engines, bad_files, tmp_path, capsys):
    argv = _resolve(case, sd_engines, bad_files, tmp_path)
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, *CLI_CASES[case][1])
    assert "wrote" not in captured.out
    assert not (tmp_path / "out.png").exists()


def test_cli_output_format_pil_cannot_write(sd_engines, tmp_path, capsys):
    argv = _sdedit_argv(sd_engines.root, out=tmp_path / "out.psd", steps=2, strength=0.5)
    assert cli.main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, "out.psd")


SUBPROCESS_CASES = {
    # the pixel limit through the environment variable, read at import
    "max-pixels-env": (dict(), {"TI2I_MAX_PIXELS": "1000"}, ("256×256", "65536 pixels", "limit of 1000")),
    "grpc-unreachable": (dict(server="grpc://127.0.0.1:1"), {}, ("unreachable",)),
    "text-file": (dict(image="{text}"), {}, ("not a readable image",)),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_cli_bad_input_exit_code_and_stderr(case, sd_engines, bad_files, tmp_path):
    options, env, words = SUBPROCESS_CASES[case]
    options = {k: v.format(text=bad_files["text"]) for k, v in options.items()}
    argv = _sdedit_argv(sd_engines.root, out=tmp_path / "out.png", **options)
    proc = subprocess.run([sys.executable, "-m", "ti2i.client.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_error_line(proc.stderr, *words)
    assert not (tmp_path / "out.png").exists()


# --------------------------------------------------------------------------- Triton server


def _client(protocol: str, server):
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(server.grpc_url)
    import tritonclient.http as module

    return module, module.InferenceServerClient(server.http_url)


def _f32(*shape):
    return np.zeros(shape, np.float32)


# (model, {input: (array, wire dtype)}, words the message must hold)
SERVER_CASES = {
    "unet-height-out-of-range": ("unet", {"sample": (_f32(1, 4, 300, 8), "FP32"), "timestep": (_f32(1, 1), "FP32"),
                                          "encoder_hidden_states": (_f32(1, 77, 32), "FP32")},
                                 ("sample", "[1, 256]", "300")),
    "unet-batch-mismatch": ("unet", {"sample": (_f32(2, 4, 8, 8), "FP32"), "timestep": (_f32(2, 1), "FP32"),
                                     "encoder_hidden_states": (_f32(1, 77, 32), "FP32")},
                            ("batch size",)),
    "unet-fp64": ("unet", {"sample": (np.zeros((1, 4, 8, 8)), "FP64"), "timestep": (_f32(1, 1), "FP32"),
                           "encoder_hidden_states": (_f32(1, 77, 32), "FP32")},
                  ("'sample'", "FP64", "FP32")),
    "unet-rank": ("unet", {"sample": (_f32(1, 4, 8), "FP32"), "timestep": (_f32(1, 1), "FP32"),
                           "encoder_hidden_states": (_f32(1, 77, 32), "FP32")},
                  ("'sample'", "shape")),
    "encode_image-too-tall": ("encode_image", {"image": (np.zeros((1, 3000, 8, 3), np.uint8), "UINT8")},
                              ("image", "[8, 2048]", "3000")),
    "tokenize-not-utf8": ("tokenize", {"text": (np.array([[b"\xff\xfe caf\xe9"]], dtype=object), "BYTES")},
                          ("text", "UTF-8")),
    "encode_prompt-not-utf8": ("encode_prompt", {"text": (np.array([[b"\xff"]], dtype=object), "BYTES")},
                               ("text", "UTF-8")),
}


def _send_bad(protocol: str, server, case: str) -> tuple[str, str]:
    from tritonclient.utils import InferenceServerException

    model, inputs, _ = SERVER_CASES[case]
    module, client = _client(protocol, server)
    try:
        infer_inputs = []
        for name, (value, dtype) in inputs.items():
            infer_input = module.InferInput(name, list(value.shape), dtype)
            infer_input.set_data_from_numpy(value)
            infer_inputs.append(infer_input)
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, infer_inputs)
        return str(info.value.status()), info.value.message()
    finally:
        client.close()


INVALID_ARG = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


@pytest.mark.parametrize("case", list(SERVER_CASES))
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_rejects_bad_request_with_invalid_arg(protocol, case, triton_server):
    status, message = _send_bad(protocol, triton_server, case)
    assert status == INVALID_ARG[protocol], (status, message)
    names = [n for n in SERVER_CASES[case][1]]
    assert any(n in message for n in names), f"no tensor of {names} named in {message!r}"
    for word in SERVER_CASES[case][2]:
        assert word in message, f"{word!r} not in {message!r}"
    assert triton_server.is_alive()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_runner_maps_invalid_arg_to_invalid_input_error(protocol, triton_server):
    url = server_url(triton_server, protocol)
    with TritonRunner(url) as served:
        with pytest.raises(InvalidInputError) as info:
            served.run("unet", **_unet_inputs(sample=_f32(1, 4, 300, 8)))
        assert_says(info.value, "unet", "sample", "300")
        with pytest.raises(InvalidInputError) as info:  # checked client-side against the model config
            served.run("unet", **_unet_inputs(sample=None, smple=_f32(1, 4, 6, 8)))
        assert_says(info.value, "smple")
        with pytest.raises(InvalidInputError) as info:  # the image is over what the server's VAE accepts
            sdedit(served, Image.new("RGB", (8, 2400)), "a cat", **fast())
        assert_says(info.value, "image", "2400", "[8, 2048]")
        with pytest.raises(ModelNotFoundError):
            served.run("no_such_model", x=_f32(1))


def test_server_stays_up_and_serves_after_bad_requests(triton_server, sd_engines, example_image):
    for protocol in ("grpc", "http"):
        for case in SERVER_CASES:
            assert _send_bad(protocol, triton_server, case)[0] == INVALID_ARG[protocol]
    assert triton_server.is_alive()
    for protocol in ("grpc", "http"):
        module, client = _client(protocol, triton_server)
        try:
            assert client.is_server_live() and client.is_server_ready()
            for model in ("unet", "tokenize", "encode_image", "encode_prompt", "decode_image"):
                assert client.is_model_ready(model), model
        finally:
            client.close()
    with InProcessRunner(sd_engines.root) as local:
        expected = sdedit(local, example_image, "a cat", **fast(seed=7))
    for url in (f"grpc://{triton_server.grpc_url}", f"http://{triton_server.http_url}"):
        with TritonRunner(url) as served:
            got = sdedit(served, example_image, "a cat", **fast(seed=7))
        assert got.image.size == (64, 48)
        assert float(np.abs(got.array - expected.array).max()) <= 1e-5


# --------------------------------------------------------------------------- the python-backend model, in-process


class _FakeTensor:
    def __init__(self, name: str, value: np.ndarray):
        self._name, self._value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


class _FakeError:
    INVALID_ARG, INTERNAL = 3, 13

    def __init__(self, message: str, code: int):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class _FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


def _fake_pb_utils() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _FakeTensor
    module.TritonError = _FakeError
    module.InferenceResponse = _FakeResponse
    module.get_input_tensor_by_name = lambda request, name: (
        _FakeTensor(name, request[name]) if name in request else None)
    return module


@pytest.fixture()
def tokenize_model(monkeypatch, sd_engines):
    from ti2i.triton_models.python_model import TritonPythonModel

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    model = TritonPythonModel()
    config = {"max_batch_size": 16, "parameters": {"engine_dir": {"string_value": str(sd_engines.root)},
                                                   "component": {"string_value": "tokenize"},
                                                   "threads": {"string_value": "1"}}}
    model.initialize({"model_config": json.dumps(config)})
    yield model
    model.finalize()


@pytest.mark.parametrize("bad", [
    pytest.param({"text": np.array([1.5], np.float32)}, id="wrong-dtype"),
    pytest.param({"text": np.array([b"\xff\xfe"], dtype=object)}, id="not-utf8"),
])
def test_one_bad_request_in_a_batch_does_not_fail_the_others(tokenize_model, bad):
    good = {"text": np.array([b"a photo of a cat"], dtype=object)}
    responses = tokenize_model.execute([good, bad, dict(good)])
    assert responses[1].error is not None and responses[1].error.code() == _FakeError.INVALID_ARG
    assert "text" in responses[1].error.message()
    for i in (0, 2):
        assert responses[i].error is None, responses[i].error.message()
        assert responses[i].outputs["input_ids"].shape == (1, 77)


# --------------------------------------------------------------------------- images as a newcomer brings them


def test_a_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    """A full-range 16-bit grayscale PNG became an all-white RGB image (Pillow clips I;16 to 255)."""
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(ramp).save(path)
    rgb = np.asarray(load_image(path), dtype=np.float64)
    assert rgb.shape == (48, 64, 3)
    np.testing.assert_allclose(rgb[..., 0], ramp / 257.0, atol=1.0)
    mask = load_image(path, convert_rgb=False, what="mask")
    assert np.asarray(mask.convert("L")).max() == 255 and np.asarray(mask.convert("L")).min() == 0


def test_an_unreadable_buffer_is_named_without_its_python_repr():
    with pytest.raises(InvalidInputError) as info:
        load_image(b"this is no image at all")
    assert "BytesIO" not in str(info.value) and "0x" not in str(info.value)
    assert "image (23 bytes) is not a readable image" in str(info.value)


def test_a_tiny_image_is_reported_at_its_own_size(runner):
    with pytest.raises(InvalidInputError) as info:
        sdedit(runner, Image.new("RGB", (1, 1)), "a cat", steps=2, progress=False)
    assert "1×1" in str(info.value) and "0×0" not in str(info.value)


@pytest.mark.parametrize("wrap", ["newlines", "data-url", "both"])
def test_base64_wrapped_or_as_a_data_url_is_accepted(wrap):
    import base64
    import io

    from ti2i.triton_models.method_io import image_bytes

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    if wrap in ("newlines", "both"):
        text = "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"
    if wrap in ("data-url", "both"):
        text = "data:image/png;base64," + text
    assert image_bytes(text.encode(), "image") == buffer.getvalue()


def test_a_hub_id_out_of_reach_is_one_line(tmp_path):
    """Without a network `ti2i export` retried for 25 s and then said the model had no config.json."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-m", "ti2i.app.cli", "export", "--model", "someone/some-model", "--out",
                           str(tmp_path / "engines")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Hugging Face hub cannot be reached" in lines[0], proc.stderr
    assert "hf download someone/some-model --local-dir DIR" in lines[0]


def test_sdxl_folders_ti2i_does_not_export_are_refused_by_name(tmp_path):
    """Aesthetic-score conditioning beside two text encoders, or one encoder on an 8-channel UNet: said so."""
    from ti2i.export.exporter import detect_kind

    (tmp_path / "unet").mkdir()
    index = {"_class_name": "StableDiffusionXLImg2ImgPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "requires_aesthetics_score": True}
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, "addition_embed_type": "text_time"}))
    with pytest.raises(InvalidInputError, match="conditions on aesthetic scores"):
        detect_kind(str(tmp_path))
    index["text_encoder"] = [None, None]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    assert detect_kind(str(tmp_path)) == "sdxl_refiner"
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"in_channels": 8, "addition_embed_type": "text_time"}))
    with pytest.raises(InvalidInputError, match="but is not an SDXL refiner"):
        detect_kind(str(tmp_path))
    (tmp_path / "unet" / "config.json").unlink()
    (tmp_path / "unet").rmdir()
    with pytest.raises(InvalidInputError, match="without a UNet"):
        detect_kind(str(tmp_path))
