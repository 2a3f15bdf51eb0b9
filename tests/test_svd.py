"""Stable Video Diffusion matches diffusers' StableVideoDiffusionPipeline frame for frame."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, max_abs, served_and_local
from diffusers import StableVideoDiffusionPipeline
from ti2i.client.cli import main
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.client.svd import svd

from ti2i.errors import InvalidInputError

TOLERANCE = 1e-3
SIZE = dict(height=48, width=64)


@pytest.fixture(scope="module")
def reference(svd_model):
    pipe = StableVideoDiffusionPipeline.from_pretrained(str(svd_model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(pipe, image, seed, frames, steps, **kwargs) -> np.ndarray:
    names = {"min_guidance": "min_guidance_scale", "max_guidance": "max_guidance_scale",
             "noise_aug": "noise_aug_strength"}
    kwargs = {names.get(k, k): v for k, v in kwargs.items()}
    return pipe(image, num_frames=frames, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np", **SIZE, **kwargs).frames[0]


CASES = {
    "defaults": dict(),
    "chunked_decode": dict(decode_chunk_size=4),
    "no_guidance": dict(min_guidance=1.0, max_guidance=1.0),
    "conditioning": dict(fps=12, motion_bucket_id=40, noise_aug=0.1, min_guidance=1.5, max_guidance=2.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, svd_engines, example_image):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, 1, 6, 4, **kwargs)
    with InProcessRunner(svd_engines.root) as runner:
        got = svd(runner, example_image, frames=6, steps=4, seed=1, progress=False, **SIZE, **kwargs)
    assert got.array.shape == expected.shape == (6, 48, 64, 3)
    assert max_abs(got.array, expected) <= TOLERANCE
    assert np.array_equal(got.frames, (got.array * 255).round().astype(np.uint8))


def test_a_chunk_of_more_frames_than_an_image_batch_decodes(svd_engines, example_image):
    with InProcessRunner(svd_engines.root) as runner:
        got = svd(runner, example_image, frames=20, steps=1, progress=False, **SIZE)
    assert got.frames.shape == (20, 48, 64, 3)


def test_defaults_come_from_the_model(svd_engines, example_image):
    facts = svd_engines.pipeline["unets"]["unet_svd"]
    assert facts["num_frames"] == 8 and (facts["default_height"], facts["default_width"]) == (576, 1024)
    with InProcessRunner(svd_engines.root) as runner:
        got = svd(runner, example_image, steps=1, progress=False, **SIZE)
    assert got.frames.shape == (8, 48, 64, 3) and got.fps == 7


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, svd_engines, svd_server, example_image):
    kwargs = CASES["chunked_decode"]
    expected = run_reference(reference, example_image, 3, 6, 4, **kwargs)
    served, local = served_and_local(svd_server, protocol, svd_engines.root, lambda runner: svd(
        runner, example_image, frames=6, steps=4, seed=3, progress=False, **SIZE, **kwargs))
    assert max_abs(served.array, expected) <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5


@pytest.mark.parametrize("bad, words", [
    (dict(frames=0), "frames"), (dict(frames=65), "frames"), (dict(fps=0), "fps"), (dict(fps=61), "fps"),
    (dict(motion_bucket_id=-1), "motion bucket"), (dict(motion_bucket_id=5000), "motion bucket"),
    (dict(noise_aug=-0.1), "noise augmentation"), (dict(decode_chunk_size=0), "decode chunk size"),
    (dict(steps=0), "steps"), (dict(max_guidance=float("nan")), "max_guidance"),
])
def test_bad_input_is_a_clear_error(bad, words, svd_engines, example_image):
    with InProcessRunner(svd_engines.root) as runner, pytest.raises(InvalidInputError, match=words):
        svd(runner, example_image, progress=False, **{"frames": 4, "steps": 1, **SIZE, **bad})


@pytest.mark.parametrize("out", ["video.mp4", "video.gif", "frames"])
def test_cli_writes_each_output_form_through_the_server(out, svd_server, tmp_path, capsys):
    target = tmp_path / out
    code = main(["svd", "--server", f"grpc://{svd_server.grpc_url}", "--image", str(EXAMPLE), "--frames", "4",
                 "--steps", "2", "--height", "48", "--width", "64", "--fps", "8", "--quiet", "--out", str(target)])
    assert code == 0
    if out == "frames":
        assert sorted(p.name for p in target.iterdir()) == [f"frame_{i:04d}.png" for i in range(4)]
    else:
        import imageio.v3 as iio

        assert iio.imread(target, index=None).shape[:3] == (4, 48, 64)


def test_cli_bad_input_exits_2_and_the_server_stays_up(svd_server, tmp_path):
    base = [sys.executable, "-m", "ti2i.client.cli", "svd", "--server", f"grpc://{svd_server.grpc_url}",
            "--image", str(EXAMPLE), "--frames", "2", "--steps", "1", "--height", "48", "--width", "64"]
    for extra in (["--out", str(tmp_path / "v.avi")], ["--motion-bucket-id", "9999", "--out", str(tmp_path / "v.mp4")],
                  ["--frames", "0", "--out", str(tmp_path / "v.gif")]):
        done = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().startswith("ti2i svd: error:") and "Traceback" not in done.stderr
    assert svd_server.is_alive()
    with TritonRunner(f"grpc://{svd_server.grpc_url}") as runner:
        assert runner.client.is_server_ready()
        assert svd(runner, EXAMPLE, frames=2, steps=1, progress=False, **SIZE).frames.shape == (2, 48, 64, 3)
