"""SDXL text-to-image, SDEdit, InstructPix2Pix and inpainting match diffusers' StableDiffusionXL pipelines seed for
seed, in-process and served as whole methods by a real Triton, on tiny random SDXL models (two text encoders, a
text-time UNet of 4, 8 and 9 input channels) exported into one engine directory."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import max_abs, server_url
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)
from ti2i.client.images import centered_ellipse_mask
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.errors import InvalidInputError
from ti2i.export.exporter import detect_kind, export_model
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.method_repository import servable_methods
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] float image
SERVED = 1 / 255  # served against in-process


@pytest.fixture(scope="module")
def references(sdxl_models):
    pipes = {"txt2img": StableDiffusionXLPipeline.from_pretrained(str(sdxl_models["sdxl"])),
             "sdedit": StableDiffusionXLImg2ImgPipeline.from_pretrained(str(sdxl_models["sdxl"])),
             "pix2pix": StableDiffusionXLInstructPix2PixPipeline.from_pretrained(str(sdxl_models["sdxl_pix2pix"])),
             "inpaint": StableDiffusionXLInpaintPipeline.from_pretrained(str(sdxl_models["sdxl_inpaint"]))}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        assert pipe.watermark is None  # no invisible-watermark here: the outputs compare as they are
    return pipes


def _assert_close(got: np.ndarray, expected: np.ndarray, tolerance: float = TOLERANCE) -> None:
    error = max_abs(got, expected)
    print(f"\nmax |Δ| = {error:.1e}")
    assert error <= tolerance


def _expected(pipe, seed: int, **kwargs) -> np.ndarray:
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]


TXT2IMG = {  # (ours, diffusers')
    "empty_negative_is_zeros": (dict(prompt="a cat", steps=4, guidance=5.0, height=64, width=48),
                                dict(prompt="a cat", num_inference_steps=4, guidance_scale=5.0, height=64, width=48)),
    "negative": (dict(prompt="a dog", negative_prompt="blurry", steps=3, guidance=7.0, height=48, width=64),
                 dict(prompt="a dog", negative_prompt="blurry", num_inference_steps=3, guidance_scale=7.0,
                      height=48, width=64)),
    "no_guidance": (dict(prompt="hills", steps=3, guidance=1.0, height=32, width=32),
                    dict(prompt="hills", num_inference_steps=3, guidance_scale=1.0, height=32, width=32)),
    "size_conditioning": (dict(prompt="a cat", steps=3, guidance=5.0, height=48, width=48, original_height=512,
                               original_width=384, crop_top=64, crop_left=16),
                          dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, height=48, width=48,
                               original_size=(512, 384), crops_coords_top_left=(64, 16))),
}
SDEDIT = (dict(prompt="a photo of a dog", strength=0.6, steps=5, guidance=5.0),
          dict(prompt="a photo of a dog", strength=0.6, num_inference_steps=5, guidance_scale=5.0))
# the XL InstructPix2Pix pipeline sizes to the model's default unless told: both are told the image's size
PIX2PIX = (dict(prompt="make it snowy", steps=4, guidance=6.0, image_guidance=1.4, height=48, width=64),
           dict(prompt="make it snowy", num_inference_steps=4, guidance_scale=6.0, image_guidance_scale=1.4,
                height=48, width=64))
INPAINT = {  # strength 1: from pure noise; below: the image noised
    "from_noise": (dict(prompt="a red door", steps=4, guidance=5.0, strength=1.0, height=48, width=64),
                   dict(prompt="a red door", num_inference_steps=4, guidance_scale=5.0, strength=1.0, height=48,
                        width=64)),
    "from_image": (dict(prompt="a red door", negative_prompt="dark", steps=5, guidance=4.0, strength=0.7, height=64,
                        width=48),
                   dict(prompt="a red door", negative_prompt="dark", num_inference_steps=5, guidance_scale=4.0,
                        strength=0.7, height=64, width=48)),
}


def test_an_sdxl_folder_exports_as_sdxl(sdxl_model, sdxl_engines):
    assert detect_kind(str(sdxl_model)) == "sdxl"
    spec = sdxl_engines.components["unet"].spec
    assert [t.name for t in spec.inputs][3:5] == ["text_embeds", "time_ids"]
    assert sdxl_engines.components["unet"].declared_as == "unet_xl"
    assert {"tokenize", "tokenize_2"} <= set(sdxl_engines.components)
    text = sdxl_engines.components["text_encoder"].spec
    assert [t.name for t in text.outputs] == ["text_embeddings", "text_embeds"]
    assert text.outputs[0].shape[-1] == 32 + 48  # both encoders' widths, concatenated
    assert servable_methods(sdxl_engines.components) == ["txt2img", "sdedit", "inpaint", "pix2pix"]
    assert [t.name for t in sdxl_engines.components["unet_pix2pix"].spec.inputs][3:5] == ["text_embeds", "time_ids"]
    assert sdxl_engines.components["unet_inpaint"].spec.inputs[0].shape[1] == 9


@pytest.mark.parametrize("case", sorted(TXT2IMG))
def test_txt2img_matches_diffusers(case, references, sdxl_engines):
    ours, theirs = TXT2IMG[case]
    expected = _expected(references["txt2img"], 3, **theirs)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["txt2img"](runner, seed=3, **ours)
    assert got.array.shape == expected.shape
    _assert_close(got.array, expected)


@pytest.mark.parametrize("method, seed", [("sdedit", 4), ("pix2pix", 5)])
def test_image_edits_match_diffusers(method, seed, references, sdxl_engines, example_image):
    ours, theirs = {"sdedit": SDEDIT, "pix2pix": PIX2PIX}[method]
    expected = _expected(references[method], seed, image=example_image, **theirs)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS[method](runner, image=example_image, seed=seed, **ours)
    assert got.array.shape == expected.shape == (48, 64, 3)
    _assert_close(got.array, expected)


@pytest.mark.parametrize("case", sorted(INPAINT))
def test_inpaint_matches_diffusers(case, references, sdxl_engines, example_image):
    ours, theirs = INPAINT[case]
    mask = centered_ellipse_mask(example_image.size)
    expected = _expected(references["inpaint"], 6, image=example_image, mask_image=mask, **theirs)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["inpaint"](runner, image=example_image, mask=mask, seed=6, **ours)
    assert got.array.shape == expected.shape
    _assert_close(got.array, expected)


def test_an_sdxl_turbo_style_model_runs_one_step_without_guidance(sdxl_model, tmp_path, example_image):
    """SDXL-Turbo's shape: the SDXL folder with Euler ancestral on trailing timesteps, one step, no guidance."""
    import json
    import shutil

    import diffusers

    model = tmp_path / "turbo"
    shutil.copytree(sdxl_model, model)
    diffusers.EulerAncestralDiscreteScheduler(timestep_spacing="trailing").save_pretrained(model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    engines = export_model(str(model), tmp_path / "engines", log=lambda _: None)
    text, image = (cls.from_pretrained(str(model)) for cls in (StableDiffusionXLPipeline,
                                                                 StableDiffusionXLImg2ImgPipeline))
    expected_text = _expected(text, 1, prompt="a fox", num_inference_steps=1, guidance_scale=0.0)
    expected_edit = _expected(image, 1, prompt="a fox", image=example_image, strength=0.5, num_inference_steps=2,
                              guidance_scale=0.0)
    with InProcessRunner(engines.root) as runner:
        got_text = METHODS["txt2img"](runner, prompt="a fox", steps=1, guidance=0.0, seed=1)
        got_edit = METHODS["sdedit"](runner, prompt="a fox", image=example_image, strength=0.5, steps=2,
                                     guidance=0.0, seed=1)
    _assert_close(got_text.array, expected_text)
    _assert_close(got_edit.array, expected_edit)


def test_left_out_parameters_take_the_sdxl_pipelines_defaults(references, sdxl_engines, example_image):
    """guidance 5 (not SD's 7.5) and SDEdit's strength 0.3 (not 0.8), as the SDXL pipelines default them."""
    expected = _expected(references["sdedit"], 4, image=example_image, prompt="a dog", num_inference_steps=10)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["sdedit"](runner, image=example_image, prompt="a dog", steps=10, seed=4)
        sd_defaults = METHODS["sdedit"](runner, image=example_image, prompt="a dog", steps=10, seed=4,
                                        guidance=7.5, strength=0.8)
    _assert_close(got.array, expected)
    assert max_abs(sd_defaults.array, expected) > 2 * TOLERANCE


def test_size_conditioning_changes_the_image(sdxl_engines):
    """The size conditions reach the UNet (the parity case above would pass if they were ignored only by chance)."""
    with InProcessRunner(sdxl_engines.root) as runner:
        plain = METHODS["txt2img"](runner, seed=3, **TXT2IMG["size_conditioning"][0] | dict(
            original_height=None, original_width=None, crop_top=None, crop_left=None))
        cropped = METHODS["txt2img"](runner, seed=3, **TXT2IMG["size_conditioning"][0])
    assert max_abs(plain.array, cropped.array) > 2 * TOLERANCE  # beyond what the parity case tolerates


def test_size_conditions_on_an_sd_model_are_one_clear_error(sd_engines):
    with InProcessRunner(sd_engines.root) as runner:
        with pytest.raises(InvalidInputError, match="crop_left is an SDXL size condition"):
            METHODS["txt2img"](runner, prompt="a cat", steps=2, crop_left=8)


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_model, tmp_path_factory):
    from ti2i.export.tiny import write_random_lora

    return write_random_lora(sdxl_model, tmp_path_factory.mktemp("sdxl-lora") / "unet", 1, text_encoder=False)


def test_a_per_request_lora_matches_load_lora_weights(sdxl_model, sdxl_engines, sdxl_lora):
    """A UNet adapter of the base, chosen per request: equal to diffusers with it loaded (the refiner beside the
    base, another architecture, is left as it is)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_model))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(sdxl_lora))
    expected = _expected(pipe, 2, prompt="a cat", num_inference_steps=3, guidance_scale=5.0, height=48, width=48)
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["txt2img"](runner, prompt="a cat", steps=3, guidance=5.0, height=48, width=48, seed=2,
                                 lora=[str(sdxl_lora)])
        plain = METHODS["txt2img"](runner, prompt="a cat", steps=3, guidance=5.0, height=48, width=48, seed=2)
    _assert_close(got.array, expected)
    assert max_abs(plain.array, expected) > 2 * TOLERANCE


def test_a_lora_of_the_text_encoders_is_one_clear_error(sdxl_model, sdxl_engines, tmp_path):
    from ti2i.export.tiny import write_random_lora

    adapter = write_random_lora(sdxl_model, tmp_path / "with-text", 2, text_encoder=True)
    with InProcessRunner(sdxl_engines.root) as runner:
        with pytest.raises(InvalidInputError, match="adapts text_encoder, which per-request adapters do not reach"):
            METHODS["txt2img"](runner, prompt="a cat", steps=2, lora=[str(adapter)])


@pytest.mark.parametrize("scheduler", ["dpm++2m-karras", "euler-a"])
def test_a_chosen_scheduler_matches_diffusers(scheduler, references, sdxl_engines):
    import diffusers
    from ti2i.client.schedulers import SCHEDULER_NAMES

    pipe = references["txt2img"]
    cls_name, settings = SCHEDULER_NAMES[scheduler]
    default = pipe.scheduler
    pipe.scheduler = getattr(diffusers, cls_name).from_config(default.config, **settings)
    try:
        expected = _expected(pipe, 4, prompt="a cat", num_inference_steps=4, guidance_scale=5.0, height=48, width=48)
    finally:
        pipe.scheduler = default
    with InProcessRunner(sdxl_engines.root) as runner:
        got = METHODS["txt2img"](runner, prompt="a cat", steps=4, guidance=5.0, height=48, width=48, seed=4,
                                 scheduler=scheduler)
    _assert_close(got.array, expected)


@pytest.fixture(scope="module")
def control(sdxl_models, tmp_path_factory):
    """A random ControlNet of the SDXL base, exported with the base and the inpainting model into one directory."""
    from diffusers import ControlNetModel
    from ti2i.export.tiny import write_random_controlnet

    root = tmp_path_factory.mktemp("sdxl-control")
    folder = write_random_controlnet(sdxl_models["sdxl"], root / "canny", 3)
    for kind in ("sdxl", "sdxl_inpaint"):
        manifest = export_model(str(sdxl_models[kind]), root / "engines", controlnets=[str(folder)],
                                log=lambda _: None)
    image = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    from PIL import Image
    return manifest, ControlNetModel.from_pretrained(str(folder)), Image.fromarray(image)


CONTROLLED = {  # method: (its diffusers pipeline, the model kind, ours, theirs)
    "txt2img": ("StableDiffusionXLControlNetPipeline", "sdxl", dict(steps=3, height=64, width=48),
                dict(num_inference_steps=3, height=64, width=48)),
    "sdedit": ("StableDiffusionXLControlNetImg2ImgPipeline", "sdxl", dict(strength=0.6, steps=5),
               dict(strength=0.6, num_inference_steps=5)),
    "inpaint": ("StableDiffusionXLControlNetInpaintPipeline", "sdxl_inpaint",
                dict(strength=0.7, steps=5, height=64, width=48),
                dict(strength=0.7, num_inference_steps=5, height=64, width=48, controlnet_conditioning_scale=0.5)),
}


@pytest.mark.parametrize("method", sorted(CONTROLLED))
def test_controlnet_matches_the_sdxl_controlnet_pipelines(method, control, sdxl_models, example_image):
    import diffusers

    manifest, net, control_image = control
    pipeline, kind, ours, theirs = CONTROLLED[method]
    pipe = getattr(diffusers, pipeline).from_pretrained(str(sdxl_models[kind]), controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    image = example_image.resize(control_image.size)
    inputs = {"txt2img": {}, "sdedit": {"image": image},
              "inpaint": {"image": image, "mask": centered_ellipse_mask(image.size)}}[method]
    reference_inputs = {"mask_image": inputs["mask"], "image": image} if method == "inpaint" else inputs
    control_key = "image" if method == "txt2img" else "control_image"
    expected = _expected(pipe, 2, prompt="a house", guidance_scale=5.0, **{control_key: control_image},
                         **reference_inputs, **theirs)
    with InProcessRunner(manifest.root) as runner:
        got = METHODS[method](runner, prompt="a house", guidance=5.0, seed=2, control_image=control_image, **inputs,
                              **ours)
        uncontrolled = METHODS[method](runner, prompt="a house", guidance=5.0, seed=2, **inputs, **ours)
    assert got.array.shape == expected.shape
    _assert_close(got.array, expected)
    assert max_abs(uncontrolled.array, expected) > 2 * TOLERANCE


def test_a_method_not_written_for_sdxl_is_one_clear_error(sdxl_engines, example_image):
    with InProcessRunner(sdxl_engines.root) as runner:
        with pytest.raises(InvalidInputError, match="cyclediffusion does not run on an SDXL model"):
            METHODS["cyclediffusion"](runner, image=example_image, source_prompt="a", prompt="b", steps=2)
    with pytest.raises(InvalidInputError, match="ddib does not run on the SDXL models"):
        write_repository(sdxl_engines, sdxl_engines.root.parent / "refused", methods=["ddib"],
                         core_options=CoreOptions())


def test_base_and_refiner_equal_the_ensemble_of_experts(sdxl_models, sdxl_engines):
    """txt2img with `refine`: diffusers' recipe, the base to denoising_end, the refiner from denoising_start, one
    generator through both."""
    base, refiner = references_of(sdxl_models)
    for negative in (None, "blurry"):
        generator = torch.Generator("cpu").manual_seed(9)
        latents = base("a cat", negative_prompt=negative, num_inference_steps=6, denoising_end=0.7,
                       guidance_scale=5.0, height=64, width=48, generator=generator, output_type="latent").images
        expected = refiner("a cat", negative_prompt=negative, image=latents, num_inference_steps=6,
                           denoising_start=0.7, guidance_scale=5.0, generator=generator, output_type="np").images[0]
        with InProcessRunner(sdxl_engines.root) as runner:
            got = METHODS["txt2img"](runner, prompt="a cat", negative_prompt=negative, steps=6, refine=0.7,
                                     guidance=5.0, height=64, width=48, seed=9)
            unrefined = METHODS["txt2img"](runner, prompt="a cat", negative_prompt=negative, steps=6, guidance=5.0,
                                           height=64, width=48, seed=9)
        _assert_close(got.array, expected)
        assert max_abs(unrefined.array, expected) > 2 * TOLERANCE  # the refiner really ran


def references_of(models):
    base = StableDiffusionXLPipeline.from_pretrained(str(models["sdxl"]))
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(models["sdxl_refiner"]))
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


def test_a_refiner_needs_its_base(sdxl_models, sd_engines, tmp_path):
    """A refiner alone, beside an SD 1.x model, or beside another base than its own: each one clear error."""
    from ti2i.export.tiny import write_tiny_model

    with pytest.raises(InvalidInputError, match="joins its base's engine directory"):
        export_model(str(sdxl_models["sdxl_refiner"]), tmp_path / "alone", log=lambda _: None)
    with InProcessRunner(sd_engines.root) as runner:
        with pytest.raises(InvalidInputError, match="refine needs an SDXL refiner"):
            METHODS["txt2img"](runner, prompt="a cat", steps=2, refine=0.5)
        with pytest.raises(InvalidInputError, match="give refine too"):
            METHODS["txt2img"](runner, prompt="a cat", steps=2, aesthetic_score=7.0)
    other_base = export_model(str(write_tiny_model("sdxl", tmp_path / "other", seed=1)), tmp_path / "engines",
                              log=lambda _: None)
    with pytest.raises(InvalidInputError, match="second text encoder is not its base's"):
        export_model(str(sdxl_models["sdxl_refiner"]), other_base.root, log=lambda _: None)


@pytest.fixture(scope="module")
def sdxl_server(sdxl_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-served")
    repository = write_repository(sdxl_engines, root / "repository", methods=servable_methods(sdxl_engines.components),
                                  core_options=CoreOptions(active=2))
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


def test_served_methods_equal_in_process(sdxl_server, sdxl_engines, example_image):
    """Each SDXL method as a whole method model (gRPC, streamed, all at once: their UNet steps batch together
    in the core with their own text-time inputs; then HTTP), equal to the in-process loop."""
    calls = {"txt2img": dict(TXT2IMG["size_conditioning"][0], seed=5),
             "sdedit": dict(SDEDIT[0], image=example_image, seed=6),
             "pix2pix": dict(PIX2PIX[0], image=example_image, seed=7),
             "inpaint": dict(INPAINT["from_image"][0], image=example_image,
                             mask=centered_ellipse_mask(example_image.size), seed=8),
             "txt2img_refined": dict(prompt="a cat", steps=4, refine=0.6, guidance=5.0, height=48, width=32,
                                     aesthetic_score=7.0, seed=9)}
    with InProcessRunner(sdxl_engines.root) as runner:
        local = {name: METHODS[name.split("_")[0]](runner, **values) for name, values in calls.items()}
    def grpc(name: str):
        return run_remote(server_url(sdxl_server, "grpc"), METHODS[name.split("_")[0]], progress=False,
                          **calls[name])

    with ThreadPoolExecutor(len(calls)) as pool:
        streamed = dict(zip(calls, pool.map(grpc, calls)))
    for name, values in calls.items():
        http = run_remote(server_url(sdxl_server, "http"), METHODS[name.split("_")[0]], progress=False,
                          stream=False, **values)
        for served in (streamed[name], http):
            assert max_abs(np.asarray(served.image) / 255.0, local[name].array) <= SERVED, name
