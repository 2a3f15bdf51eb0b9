"""Numeric inputs out of any sane range, and the operator's ceilings on the work of one request.

Every case is refused with one InvalidInputError naming the parameter (exit code 2 and one line from the
CLI), never a ValueError or OverflowError from numpy, torch or a scheduler: through the method record
(the CLI's and the server's check), the served request's reader, the method functions and `WorkLimits`.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
from conftest import EXAMPLE
from ti2i.client import cli
from ti2i.client.registry import METHODS, SEED
from ti2i.client.remote import request_tensors
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit
from ti2i.triton_models.method_io import read_request
from ti2i.work_limits import WorkLimits

from ti2i.errors import InvalidInputError

HUGE_STEPS = 2**62
SDEDIT = METHODS["sdedit"]


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width×height and carries no pixels: its size is read from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def refused(words: tuple[str, ...], run) -> str:
    with pytest.raises(InvalidInputError) as info:
        run()
    message = str(info.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


def served_call(method_name: str = "sdedit", **tensors: np.ndarray) -> dict:
    """read_request over a dict of tensors, as a method model reads one (the image is the example file)."""
    inputs = {"image": np.array([EXAMPLE.read_bytes()], dtype=object),
              "prompt": np.array([b"a cat"], dtype=object), **tensors}
    return read_request(METHODS[method_name], inputs.get)[0]


# --------------------------------------------------------------------------- the record: one check for all

BAD_VALUES = [  # (parameter, value, words the message must hold)
    ("seed", 2**64, ("seed", "[0, 2**63 - 1]", str(2**64))),
    ("seed", 2**63, ("seed", "[0, 2**63 - 1]")),
    ("seed", -1, ("seed", "[0, 2**63 - 1]", "got -1")),
    ("steps", 2**64, ("steps", "positive integer below 2**63")),
    ("steps", 0, ("steps", "got 0")),
    ("steps", 2.5, ("steps", "got 2.5")),
    ("strength", math.nan, ("strength", "(0.0, 1.0]", "got nan")),
    ("strength", 10**400, ("strength", "(0.0, 1.0]", "characters")),
    ("guidance", math.inf, ("guidance", "finite", "got inf")),
    ("guidance", -math.inf, ("guidance", "finite")),
    ("height", -8, ("height", "positive")),
]


@pytest.mark.parametrize("name, value, words", BAD_VALUES, ids=[f"{b[0]}={b[1]!s:.12}" for b in BAD_VALUES])
def test_the_record_refuses_a_value_naming_the_parameter_and_its_range(name, value, words):
    refused(words, lambda: SDEDIT.check({"prompt": "a cat", name: value}))


def test_the_record_passes_good_values_as_python_numbers():
    call = SDEDIT.check({"steps": np.int64(3), "seed": 2**63 - 1, "strength": np.float32(0.5), "image": b"x"})
    assert call == {"steps": 3, "seed": 2**63 - 1, "strength": 0.5, "image": b"x"}
    assert type(call["steps"]) is int and type(call["strength"]) is float
    assert SEED.range_text() == "[0, 2**63 - 1]"


def test_video_parameters_keep_their_ranges():
    refused(("frames", "[1, 64]", "got 65"), lambda: METHODS["svd"].check({"frames": 65}))
    refused(("frames", "[2, 2**63 - 1]"), lambda: METHODS["videoldm"].check({"frames": 1}))
    refused(("fps", "> 0.0", "got inf"), lambda: METHODS["videoldm"].check({"fps": math.inf}))


# --------------------------------------------------------------------------- the served request's reader


@pytest.mark.parametrize("name, tensor, words", [
    ("seed", np.array([2**64 - 1], dtype=np.uint64), ("seed", "[0, 2**63 - 1]")),
    ("seed", np.array([-1], dtype=np.int64), ("seed", "got -1")),
    ("steps", np.array([1e30]), ("steps", "positive integer")),
    ("strength", np.array([np.nan]), ("strength", "(0.0, 1.0]", "nan")),
    ("guidance", np.array([np.inf]), ("guidance", "finite")),
], ids=["seed-2**64-1", "seed--1", "steps-1e30", "strength-nan", "guidance-inf"])
def test_read_request_refuses_out_of_range_tensors(name, tensor, words):
    refused(words, lambda: served_call(**{name: tensor}))


def test_huge_steps_pass_the_reader_and_stop_at_the_ceiling():
    """The server's order: read_request (the record: an int64 is fine), then WorkLimits, before any wait."""
    call = served_call(steps=np.array([HUGE_STEPS], dtype=np.int64))
    assert call["steps"] == HUGE_STEPS
    message = refused(("steps", str(HUGE_STEPS), "1000", "--max-steps"), lambda: WorkLimits().check("sdedit", call))
    assert message == f"sdedit: steps {HUGE_STEPS} is over this server's limit of 1000 (--max-steps)"


def test_a_seed_the_wire_cannot_carry_is_refused_by_the_client():
    refused(("seed", "[0, 2**63 - 1]"), lambda: request_tensors(SDEDIT, image=b"x", prompt="a cat", seed=2**64))
    assert request_tensors(SDEDIT, image=b"x", prompt="a cat", seed=2**63 - 1)["seed"].dtype == np.int64


# --------------------------------------------------------------------------- the method functions


@pytest.fixture(scope="module")
def runner(sd_engines):
    with InProcessRunner(sd_engines.root) as r:
        yield r


@pytest.mark.parametrize("change, words", [
    (dict(steps=HUGE_STEPS), ("steps", "at most 999", str(HUGE_STEPS))),
    # PNDM's "leading" spacing adds steps_offset 1: 1000 steps would reach timestep 1000 (an IndexError)
    (dict(steps=1000, strength=1.0), ("steps", "at most 999")),
    (dict(steps=math.inf), ("steps", "got inf")),
    (dict(guidance=10**400), ("guidance", "finite")),
    (dict(seed=2**64), ("seed", "[0, 2**63 - 1]")),
    (dict(seed=-1), ("seed", "[0, 2**63 - 1]")),
], ids=["steps-2**62", "steps-1000", "steps-inf", "guidance-10**400", "seed-2**64", "seed--1"])
def test_the_function_called_directly_refuses_them_too(change, words, runner, example_image):
    refused(words, lambda: sdedit(runner, example_image, "a cat", progress=False,
                                  **{"steps": 2, "strength": 0.5, **change}))


def test_the_largest_seed_runs(runner, example_image):
    result = sdedit(runner, example_image, "a cat", steps=2, strength=0.5, seed=2**63 - 1, progress=False)
    assert result.image.size == (64, 48)


# --------------------------------------------------------------------------- the CLI, in-process


@pytest.mark.parametrize("option, value, words", [
    ("--steps", str(HUGE_STEPS), ("steps", "at most 999")),
    ("--steps", str(2**64), ("steps", "below 2**63")),
    ("--seed", str(2**64), ("seed", "[0, 2**63 - 1]", str(2**64))),
    ("--seed", "-1", ("seed", "[0, 2**63 - 1]", "got -1")),
    ("--strength", "nan", ("strength", "(0.0, 1.0]", "nan")),
    ("--guidance", "1e400", ("guidance", "finite", "inf")),
], ids=["steps-2**62", "steps-2**64", "seed-2**64", "seed--1", "strength-nan", "guidance-1e400"])
def test_cli_exits_2_with_one_line(option, value, words, sd_engines, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["sdedit", "--engines", str(sd_engines.root), "--image", str(EXAMPLE), "--prompt", "a cat",
            "--out", str(out), "--steps", "2", "--strength", "0.5", "--height", "48", "--width", "64", "--quiet",
            option, value]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ti2i sdedit: error: "), captured.err
    assert "Traceback" not in captured.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()


# --------------------------------------------------------------------------- WorkLimits


def test_steps_over_the_ceiling():
    limits = WorkLimits()
    limits.check("sdedit", {"steps": 1000})
    limits.check("sdedit", {})  # the record's default, 50
    assert refused(("steps",), lambda: limits.check("sdedit", {"steps": 100_000})) == \
        "sdedit: steps 100000 is over this server's limit of 1000 (--max-steps)"
    refused(("steps 11", "limit of 10"), lambda: WorkLimits(max_steps=10).check("txt2img", {"steps": 11}))
    refused(("steps 100", "limit of 50"), lambda: WorkLimits(max_steps=50).check("pix2pix", {}))  # its default


def test_ordinary_outputs_fit_the_default_pixels():
    limits = WorkLimits()
    limits.check("svd", {"frames": 25, "height": 576, "width": 1024})
    limits.check("svd", {})  # 25 frames of 576×1024 counted for what the model decides
    limits.check("txt2img", {"height": 1024, "width": 1024})
    limits.check("txt2img", {})
    limits.check("videoldm", {"frames": 32, "image": png_header(512, 512)})
    limits.check("sdedit", {"image": png_header(2048, 2048)})


@pytest.mark.parametrize("method, call, words", [
    ("svd", {"frames": 64, "height": 576, "width": 1024}, ("frames × height × width = 64 × 576 × 1024",
                                                           "37748736", "--max-pixels")),
    ("svd", {"frames": 64}, ("64 × 576 × 1024", "height left to the model, counted as 576")),
    ("svd", {"height": 2048, "width": 2048}, ("25 × 2048 × 2048", "frames left to the model, counted as 25")),
    ("videoldm", {"frames": 32, "image": png_header(1024, 1024)},
     ("32 × 1024 × 1024", "height 1024: the input image's")),
    ("videoldm", {"frames": 32, "height": 1024, "width": 1024, "image": b"not an image"}, ("32 × 1024 × 1024",)),
    ("txt2img", {"height": 4096, "width": 8192}, ("height × width = 4096 × 8192", "limit of 16777216")),
], ids=["svd-64-frames", "svd-64-frames-model-size", "svd-model-frames", "videoldm-image-size", "videoldm-given",
        "txt2img"])
def test_frames_times_pixels_over_the_ceiling(method, call, words):
    refused((f"{method}: ", *words), lambda: WorkLimits().check(method, call))


def test_an_unreadable_image_is_left_to_the_method():
    WorkLimits(max_pixels=1).check("sdedit", {"image": b"not an image"})


def test_the_ceiling_reads_the_served_call_and_checks_its_values():
    call = served_call(height=np.array([512], dtype=np.int64))  # width: the example image's
    refused(("height × width = 512 × ", "the input image's", "limit of 1000"),
            lambda: WorkLimits(max_pixels=1000).check("sdedit", call))
    refused(("seed", "[0, 2**63 - 1]"), lambda: WorkLimits().check("sdedit", {"seed": -1}))
    refused(("unknown method",), lambda: WorkLimits().check("nope", {}))


@pytest.mark.parametrize("limits, words", [
    (dict(max_steps=0), ("--max-steps", "positive")), (dict(max_pixels=-1), ("--max-pixels", "positive")),
    (dict(max_steps=2.5), ("--max-steps",)),
])
def test_the_limits_themselves_are_checked(limits, words):
    refused(words, lambda: WorkLimits(**limits))


def test_defaults():
    assert WorkLimits() == WorkLimits(max_steps=1000, max_pixels=2**24)
    with pytest.raises(AttributeError):
        WorkLimits().max_steps = 5  # frozen: shared by every request of a server
