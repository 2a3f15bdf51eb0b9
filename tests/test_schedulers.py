"""A choice of scheduler: every short name (and a diffusers class name) on SDEdit and text-to-image equals the
diffusers pipeline with that scheduler built from the model folder's config, seed for seed."""

from __future__ import annotations

import threading

import diffusers
import pytest
import torch
from conftest import EXAMPLE, max_abs
from PIL import Image
from ti2i.client.runners import InProcessRunner
from ti2i.client.schedulers import SCHEDULER_NAMES
from ti2i.client.sdedit import sdedit
from ti2i.client.txt2img import txt2img
from ti2i.errors import InvalidInputError

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] float image
SEED = 7


def _with_scheduler(pipe, name: str):
    cls_name, settings = SCHEDULER_NAMES.get(name, (name, {}))
    if cls_name == "DPMSolverSDEScheduler":  # its Brownian noise is seeded by config (ti2i: the request's seed)
        settings = {**settings, "noise_sampler_seed": SEED}
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.model_scheduler_config, **settings)
    return pipe


@pytest.fixture(scope="module")
def pipelines(sd_model):
    common = dict(safety_checker=None, requires_safety_checker=False)
    text = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_model), **common)
    image = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(sd_model), **common)
    for pipe in (text, image):
        pipe.set_progress_bar_config(disable=True)
        pipe.model_scheduler_config = pipe.scheduler.config  # each test's scheduler is built from the model's
    return {"txt2img": text, "sdedit": image}


@pytest.fixture(scope="module")
def runner(engines):
    with InProcessRunner(engines.root) as runner:
        yield runner


def _generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(SEED)


@pytest.mark.parametrize("name", [*SCHEDULER_NAMES, "KDPM2DiscreteScheduler"])
def test_txt2img_with_each_scheduler_matches_diffusers(name, pipelines, runner):
    pipe = _with_scheduler(pipelines["txt2img"], name)
    expected = pipe("hills at dusk", num_inference_steps=5, guidance_scale=7.5, height=32, width=40,
                    generator=_generator(), output_type="np").images[0]
    got = txt2img(runner, "hills at dusk", steps=5, guidance=7.5, height=32, width=40, seed=SEED, scheduler=name,
                  progress=False)
    error = max_abs(got.array, expected)
    print(f"\ntxt2img {name}: max |Δ| = {error:.1e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize("name", list(SCHEDULER_NAMES))
def test_sdedit_with_each_scheduler_matches_diffusers(name, pipelines, runner):
    image = Image.open(EXAMPLE).convert("RGB").resize((48, 32))
    pipe = _with_scheduler(pipelines["sdedit"], name)
    expected = pipe("a watercolor", image=image, strength=0.6, num_inference_steps=8, guidance_scale=7.5,
                    generator=_generator(), output_type="np").images[0]
    got = sdedit(runner, image, "a watercolor", strength=0.6, steps=8, guidance=7.5, seed=SEED, scheduler=name,
                 progress=False)
    error = max_abs(got.array, expected)
    print(f"\nsdedit {name}: max |Δ| = {error:.1e}")
    assert error <= TOLERANCE


def test_the_models_scheduler_stays_the_default(runner):
    default = txt2img(runner, "hills", steps=3, height=32, width=32, seed=SEED, progress=False)
    named = txt2img(runner, "hills", steps=3, height=32, width=32, seed=SEED, scheduler="pndm", progress=False)
    other = txt2img(runner, "hills", steps=3, height=32, width=32, seed=SEED, scheduler="euler", progress=False)
    assert max_abs(default.array, named.array) == 0.0  # the tiny model ships PNDM
    assert max_abs(default.array, other.array) > 1e-3


@pytest.mark.parametrize("name", ["pndm", "dpm++2m"])
def test_concurrent_requests_never_share_a_scheduler(name, runner):
    """A built scheduler is only a template each request copies: two loops stepping at once (a server's
    requests) each keep their own history (PNDM's `ets`, DPM-Solver's model outputs) and step counters."""
    calls = [dict(prompt="hills", steps=6, seed=SEED), dict(prompt="a lake", steps=4, seed=SEED + 1)]
    alone = [txt2img(runner, height=32, width=32, scheduler=name, progress=False, **c).array for c in calls]
    together: list = [None, None]

    def run(i: int) -> None:
        together[i] = txt2img(runner, height=32, width=32, scheduler=name, progress=False, **calls[i]).array

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [max_abs(a, b) for a, b in zip(alone, together)] == [0.0, 0.0]


@pytest.mark.parametrize("name, words", [
    ("warp-drive", "unknown scheduler 'warp-drive'"),
    ("AutoencoderKL", "unknown scheduler 'AutoencoderKL'"),
    ("SchedulerMixin", "unknown scheduler 'SchedulerMixin'"),
])
def test_an_unknown_scheduler_is_one_clear_error(name, words, runner):
    with pytest.raises(InvalidInputError, match=words) as info:
        txt2img(runner, "hills", steps=3, height=32, width=32, scheduler=name, progress=False)
    assert "dpm++2m-karras" in str(info.value)  # it lists what is known


def test_a_turbo_style_model_runs_one_step_without_guidance(sd_model, tmp_path):
    """SD-Turbo's shape: an SD 2.x UNet (linear projections in its attention blocks), an Euler scheduler with
    trailing timesteps, one step, no guidance: equal to diffusers through the same methods."""
    import json
    import shutil

    from ti2i.export.exporter import export_model
    from ti2i.export.tiny import build_unet

    model = tmp_path / "turbo"
    shutil.copytree(sd_model, model)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        unet = diffusers.UNet2DConditionModel.from_config({**build_unet(4).config, "use_linear_projection": True})
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet")
    diffusers.EulerDiscreteScheduler(timestep_spacing="trailing").save_pretrained(model / "scheduler")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    engines = export_model(str(model), tmp_path / "engines", log=lambda _: None)
    common = dict(safety_checker=None, requires_safety_checker=False)
    text = diffusers.StableDiffusionPipeline.from_pretrained(str(model), **common)
    image = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(model), **common)
    example = Image.open(EXAMPLE).convert("RGB").resize((64, 48))
    expected_text = text("a fox", num_inference_steps=1, guidance_scale=0.0, generator=_generator(),
                         output_type="np").images[0]
    expected_edit = image("a fox", image=example, strength=0.5, num_inference_steps=2, guidance_scale=0.0,
                          generator=_generator(), output_type="np").images[0]
    with InProcessRunner(engines.root) as runner:
        got_text = txt2img(runner, "a fox", steps=1, guidance=0.0, seed=SEED, progress=False)
        got_edit = sdedit(runner, example, "a fox", strength=0.5, steps=2, guidance=0.0, seed=SEED, progress=False)
    assert max_abs(got_text.array, expected_text) <= TOLERANCE
    assert max_abs(got_edit.array, expected_edit) <= TOLERANCE
