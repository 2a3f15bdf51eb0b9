"""Text-to-image matches diffusers' StableDiffusionPipeline seed for seed, in-process and through Triton."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import max_abs, served_and_local
from diffusers import StableDiffusionPipeline
from ti2i.client import cli
from ti2i.client.runners import InProcessRunner
from ti2i.client.txt2img import txt2img

from ti2i.errors import InvalidInputError

TOLERANCE = 1e-3  # max |Δ| on the [0, 1] float image


@pytest.fixture(scope="module")
def reference(sd_model):
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CASES = {
    "guided": dict(prompt="a photo of a cat", guidance=7.5),
    "negative_prompt_and_size": dict(prompt="a photo of a dog", negative_prompt="blurry", guidance=5.0,
                                     height=40, width=56),
    "no_guidance": dict(prompt="hills", guidance=1.0),
}


def run_reference(pipe, seed, steps, prompt, guidance, negative_prompt=None, height=None, width=None):
    return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                height=height, width=width, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np").images[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, engines, record_property):
    kwargs = CASES[case]
    expected = run_reference(reference, 3, 10, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = txt2img(runner, seed=3, steps=10, progress=False, **kwargs)
        other = txt2img(runner, seed=4, steps=10, progress=False, **kwargs)
    size = (kwargs.get("height", 64), kwargs.get("width", 64), 3)  # default: sample_size 8 × VAE factor 8
    assert got.array.shape == expected.shape == size
    error = max_abs(got.array, expected)
    record_property("max_abs_error", error)
    print(f"txt2img {case}: in-process max |Δ| = {error:.2e}")
    assert error <= TOLERANCE
    assert max_abs(other.array, expected) > 10 * TOLERANCE  # the seed matters


def test_default_size_is_the_models(engines):
    assert engines.pipeline["unets"]["unet"]["default_size"] == 64
    with InProcessRunner(engines.root) as runner:
        assert txt2img(runner, "a cat", steps=1, progress=False).image.size == (64, 64)
        assert txt2img(runner, "a cat", steps=1, height=43, width=61, progress=False).image.size == (56, 40)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, engines, triton_server, record_property):
    kwargs = CASES["guided"]
    expected = run_reference(reference, 5, 8, **kwargs)
    served, local = served_and_local(triton_server, protocol, engines.root, lambda runner: txt2img(
        runner, seed=5, steps=8, progress=False, **kwargs))
    error = max_abs(served.array, expected)
    record_property("max_abs_error", error)
    print(f"txt2img through Triton ({protocol}): max |Δ| = {error:.2e}")
    assert error <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), ("steps", "got 0")),
    (dict(steps=1000), ("steps", "at most 999")),
    (dict(height=-8), ("height", "positive")),
    (dict(width=4), ("smaller than one latent pixel",)),
    (dict(guidance=float("inf")), ("guidance", "finite")),
    (dict(height=256, width=256, max_pixels=10_000), ("256×256", "limit of 10000")),
])
def test_bad_input_is_a_clear_error(engines, kwargs, words):
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError) as info:
        txt2img(runner, "a cat", progress=False, **{"steps": 2, **kwargs})
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("options, words", [
    (["--steps", "0"], ("steps",)),
    (["--height", "-8"], ("height", "positive")),
    (["--out", "{tmp}/out.xyz"], ("out.xyz", "extension")),
    (["--server", "grpc://127.0.0.1:1"], ("unreachable",)),
])
def test_cli_bad_input_exits_2_with_one_line(engines, tmp_path, capsys, options, words):
    options = [o.format(tmp=tmp_path) for o in options]
    argv = ["txt2img", "--prompt", "a cat", "--steps", "2"]
    if "--out" not in options:
        argv += ["--out", str(tmp_path / "out.png")]
    if "--server" not in options:
        argv += ["--engines", str(engines.root)]
    assert cli.main(argv + options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ti2i txt2img: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert not (tmp_path / "out.png").exists()


def test_cli_writes_the_image(engines, tmp_path, capsys):
    out = tmp_path / "t.png"
    assert cli.main(["txt2img", "--engines", str(engines.root), "--prompt", "a cat", "--steps", "2", "--seed", "1",
                     "--height", "48", "--width", "32", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with InProcessRunner(engines.root) as runner:
        expected = txt2img(runner, "a cat", steps=2, seed=1, height=48, width=32, progress=False)
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (32, 48)
        assert np.array_equal(np.asarray(image), np.asarray(expected.image))
