"""Inpainting matches diffusers' StableDiffusionInpaintPipeline seed for seed, in-process and through Triton;
bad masks and engines without a 9-channel UNet are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import EXAMPLE, max_abs, served_and_local
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image
from ti2i.client import cli
from ti2i.client.inpaint import inpaint
from ti2i.client.runners import InProcessRunner, TritonRunner

from ti2i.errors import InvalidInputError, ModelNotFoundError

TOLERANCE = 1e-3  # max |Δ| on the [0, 1] float image


@pytest.fixture(scope="module")
def reference(inpaint_model):
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(inpaint_model), safety_checker=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rectangle_mask(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "L") -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask.convert(mode)


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """White (repaint) in the middle of the 64×48 example image."""
    return rectangle_mask((64, 48), (16, 8, 48, 40))


CASES = {
    # strength 1: latents are pure noise × init sigma; draws: noise, then the masked-image posterior
    "strength_1": dict(prompt="a cat", strength=1.0, guidance=7.5),
    # strength < 1: draws: the image posterior, the noise, then the masked-image posterior
    "strength_0.6_negative": dict(prompt="a dog", negative_prompt="blurry", strength=0.6, guidance=5.0),
    "no_guidance": dict(prompt="hills", strength=1.0, guidance=1.0),
    # the model folder's DDIM with η > 0 draws at every step too
    "ddim_eta": dict(prompt="a cat", strength=0.7, guidance=7.5, eta=0.5),
    "size_given": dict(prompt="a cat", strength=1.0, guidance=7.5, height=40, width=56),
}


def run_reference(pipe, image, mask, seed, steps, prompt, strength, guidance, negative_prompt=None, eta=0.0,
                  height=None, width=None):
    return pipe(prompt, image=image, mask_image=mask, negative_prompt=negative_prompt, strength=strength,
                num_inference_steps=steps, guidance_scale=guidance, eta=eta, height=height, width=width,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_process_matches_diffusers(case, reference, engines, example_image, mask, record_property):
    kwargs = CASES[case]
    expected = run_reference(reference, example_image, mask, 5, 10, **kwargs)
    with InProcessRunner(engines.root) as runner:
        got = inpaint(runner, example_image, mask, seed=5, steps=10, progress=False, **kwargs)
    # the reference's default size is the model's (64×64 here), not the image's
    assert got.array.shape == expected.shape == (kwargs.get("height", 64), kwargs.get("width", 64), 3)
    error = max_abs(got.array, expected)
    record_property("max_abs_error", error)
    print(f"inpaint {case}: in-process max |Δ| = {error:.2e}")
    assert error <= TOLERANCE


def test_seed_and_mask_matter(engines, example_image, mask):
    kwargs = dict(steps=4, progress=False)
    with InProcessRunner(engines.root) as runner:
        base = inpaint(runner, example_image, mask, "a cat", seed=1, **kwargs)
        other_seed = inpaint(runner, example_image, mask, "a cat", seed=2, **kwargs)
        other_mask = inpaint(runner, example_image, rectangle_mask((64, 48), (0, 0, 20, 20)), "a cat", seed=1,
                             **kwargs)
    assert max_abs(base.array, other_seed.array) > 10 * TOLERANCE
    assert max_abs(base.array, other_mask.array) > 10 * TOLERANCE


@pytest.mark.parametrize("mode, size", [("L", (32, 24)), ("RGB", (80, 80)), ("1", (64, 48)), ("RGBA", (64, 48))])
def test_masks_of_other_sizes_and_modes_are_resized_like_the_reference(mode, size, reference, engines,
                                                                        example_image):
    mask = rectangle_mask(size, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4), mode)
    expected = run_reference(reference, example_image, mask, 2, 4, "a cat", 1.0, 7.5)
    with InProcessRunner(engines.root) as runner:
        got = inpaint(runner, example_image, mask, "a cat", seed=2, steps=4, progress=False)
    assert max_abs(got.array, expected) <= TOLERANCE


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_diffusers_and_in_process(protocol, reference, engines, triton_server, example_image, mask,
                                                 record_property):
    kwargs = CASES["strength_0.6_negative"]
    expected = run_reference(reference, example_image, mask, 9, 8, **kwargs)
    served, local = served_and_local(triton_server, protocol, engines.root, lambda runner: inpaint(
        runner, example_image, mask, seed=9, steps=8, progress=False, **kwargs))
    error = max_abs(served.array, expected)
    record_property("max_abs_error", error)
    print(f"inpaint through Triton ({protocol}): max |Δ| = {error:.2e}")
    assert error <= TOLERANCE
    assert max_abs(served.array, local.array) <= 1e-5


# --------------------------------------------------------------------------- bad input


def _says(err: BaseException, *words: str) -> None:
    message = str(err)
    assert "\n" not in message.strip(), message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "mask.png"
    path.write_text("not an image\n")
    return path


@pytest.mark.parametrize("bad, words", [
    ("text", ("mask", "mask.png", "not a readable image")),
    ("missing", ("mask file", "does not exist")),
    ("array", ("mask", "PIL image", "ndarray")),
    ("zero", ("mask", "zero size")),
])
def test_a_mask_that_is_not_an_image_is_a_clear_error(bad, words, engines, example_image, text_file, tmp_path):
    masks = {"text": text_file, "missing": tmp_path / "nope.png", "array": np.ones((48, 64), np.float32),
             "zero": Image.new("L", (0, 0))}
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError) as info:
        inpaint(runner, example_image, masks[bad], "a cat", steps=2, progress=False)
    _says(info.value, *words)


@pytest.mark.parametrize("kwargs, words", [
    (dict(strength=0.0), ("strength", "(0")),
    (dict(strength=1.5), ("strength",)),
    (dict(steps=0), ("steps",)),
    (dict(eta=float("nan")), ("eta", "finite")),
    (dict(steps=2, strength=0.2), ("strength", "steps")),  # runs no step
])
def test_bad_settings_are_clear_errors(kwargs, words, engines, example_image, mask):
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError) as info:
        inpaint(runner, example_image, mask, "a cat", progress=False, **{"steps": 2, **kwargs})
    _says(info.value, *words)


def _manifest_without_inpaint_unet(engines, tmp_path, in_channels: int | None = None):
    """An engine directory's manifest where the inpainting UNet is missing, or has another channel count."""
    data = json.loads((engines.root / "manifest.json").read_text())
    if in_channels is None:
        del data["pipeline"]["unets"]["unet_inpaint"]
        del data["components"]["unet_inpaint"]
    else:
        data["pipeline"]["unets"]["unet_inpaint"]["in_channels"] = in_channels
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return tmp_path


def test_engines_without_an_inpainting_unet(engines, example_image, mask, tmp_path, capsys):
    root = _manifest_without_inpaint_unet(engines, tmp_path)
    with InProcessRunner(root) as runner, pytest.raises(ModelNotFoundError) as info:
        inpaint(runner, example_image, mask, "a cat", steps=2, progress=False)
    _says(info.value, "unet_inpaint")
    assert cli.main(["inpaint", "--engines", str(root), "--image", str(EXAMPLE), "--mask", str(EXAMPLE),
                     "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ti2i inpaint: error: ") and "unet_inpaint" in err[0], err


def test_a_unet_with_another_channel_count_is_a_clear_error(engines, example_image, mask, tmp_path):
    root = _manifest_without_inpaint_unet(engines, tmp_path, in_channels=4)
    with InProcessRunner(root) as runner, pytest.raises(InvalidInputError) as info:
        inpaint(runner, example_image, mask, "a cat", steps=2, progress=False)
    _says(info.value, "9-channel", "4 input channels")


@pytest.mark.parametrize("options, words", [
    (["--mask", "{text}"], ("mask", "not a readable image")),
    (["--mask", "{tmp}/nope.png"], ("mask file", "does not exist")),
    (["--strength", "0"], ("strength",)),
    (["--out", "{tmp}/out.xyz"], ("out.xyz",)),
])
def test_cli_bad_input_exits_2_with_one_line(options, words, engines, text_file, tmp_path, capsys):
    options = [o.format(tmp=tmp_path, text=text_file) for o in options]
    argv = ["inpaint", "--engines", str(engines.root), "--image", str(EXAMPLE), "--prompt", "a cat", "--steps", "2"]
    if "--mask" not in options:
        argv += ["--mask", str(EXAMPLE)]
    if "--out" not in options:
        argv += ["--out", str(tmp_path / "out.png")]
    assert cli.main(argv + options) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ti2i inpaint: error: "), err
    for word in words:
        assert word in err[0], err[0]
    assert not (tmp_path / "out.png").exists()


def test_server_rejects_a_wrong_channel_count_and_keeps_serving(triton_server, engines, example_image, mask,
                                                                 text_file):
    url = f"grpc://{triton_server.grpc_url}"
    with TritonRunner(url) as served:
        with pytest.raises(InvalidInputError) as info:  # a 4-channel sample for the 9-channel UNet
            served.run("unet_inpaint", sample=np.zeros((1, 4, 6, 8), np.float32),
                       timestep=np.full((1,), 500.0, np.float32),
                       encoder_hidden_states=np.zeros((1, 77, 32), np.float32))
        _says(info.value, "unet_inpaint", "sample")
        with pytest.raises(InvalidInputError):
            inpaint(served, example_image, text_file, "a cat", steps=2, progress=False)
        assert triton_server.is_alive()
        got = inpaint(served, example_image, mask, "a cat", seed=3, steps=2, progress=False)
    with InProcessRunner(engines.root) as local:
        expected = inpaint(local, example_image, mask, "a cat", seed=3, steps=2, progress=False)
    assert max_abs(got.array, expected.array) <= 1e-5
