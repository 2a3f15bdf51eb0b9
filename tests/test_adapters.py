"""LoRA adapters chosen per request (engines/adapters.py): the plain engines take them as inputs, so each request
gets diffusers' result with its own adapters loaded (`load_lora_weights` + `set_adapters`), in-process and served,
and requests with different adapters, scales or none share UNet executions in the engine core.

The adapters are random (peft, `init_lora_weights=False`) on the tiny SD model, saved as `save_lora_weights`
writes them: "style" on the UNet and the text encoder, "detail" on the UNet only.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import max_abs
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline
from test_lora import _reference
from ti2i.app.cli import main
from ti2i.client.pix2pix import pix2pix
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.client.txt2img import txt2img
from ti2i.errors import InvalidInputError
from ti2i.export.tiny import write_random_lora
from ti2i.triton_models.core import CoreOptions, EngineCore
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] image (the bound)
PROMPT = "a photo of a cat"


def _expected_txt2img(sd_model: Path, chosen: dict[Path, float], seed: int = 3) -> np.ndarray:
    pipe = _reference(sd_model, chosen)
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed),
                output_type="np").images[0]


def _pipeline(sd_model: Path, chosen: dict[Path, float]) -> StableDiffusionPipeline:
    """diffusers with `chosen` loaded (`load_lora_weights` + `set_adapters`), or without any."""
    if chosen:
        return _reference(sd_model, chosen)
    return StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None, requires_safety_checker=False)


def _expected_sdedit(sd_model: Path, chosen: dict[Path, float], image, seed: int) -> np.ndarray:
    img2img = StableDiffusionImg2ImgPipeline(**_pipeline(sd_model, chosen).components)
    img2img.set_progress_bar_config(disable=True)
    return img2img("a watercolor", image=image, strength=0.6, num_inference_steps=5,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


@pytest.mark.parametrize("scales", [{"style": 0.7, "detail": 0.5}, {"style": 1.3}, {"detail": -0.8}])
def test_per_request_adapters_match_diffusers_in_process(engines, sd_model, lora_adapters, scales):
    paths = dict(zip(("style", "detail"), lora_adapters))
    chosen = {paths[name]: scale for name, scale in scales.items()}
    expected = _expected_txt2img(sd_model, chosen)
    with InProcessRunner(engines.root) as runner:
        got = txt2img(runner, PROMPT, steps=4, seed=3, progress=False,
                      lora=[f"{path}:{scale}" for path, scale in chosen.items()])
        plain = txt2img(runner, PROMPT, steps=4, seed=3, progress=False)
    error = max_abs(got.array, expected)
    print(f"txt2img with per-request adapters {scales}: max |Δ| = {error:.2e}")
    assert error <= TOLERANCE
    assert max_abs(plain.array, expected) > 10 * TOLERANCE  # the adapters matter


def test_per_request_adapters_reach_the_pix2pix_unet(engines, pix2pix_model, lora_adapters, example_image):
    style, _ = lora_adapters
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(pix2pix_model), safety_checker=None,
                                                                  requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(style), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.9])
    expected = pipe("make it snowy", image=example_image, num_inference_steps=4,
                    generator=torch.Generator("cpu").manual_seed(2), output_type="np").images[0]
    with InProcessRunner(engines.root) as runner:
        got = pix2pix(runner, example_image, "make it snowy", steps=4, seed=2, progress=False, lora=[f"{style}:0.9"])
    assert max_abs(got.array, expected) <= TOLERANCE


def test_the_core_batches_requests_with_different_adapters_into_one_unet_execution(engines, sd_model, lora_adapters,
                                                                                    example_image):
    """Three concurrent SDEdit requests (two adapters at their scales, one without any) share UNet executions,
    each result equal to diffusers with its own adapters."""
    style, detail = lora_adapters
    requests = {"style": ({style: 0.8}, ["style:0.8"]), "both": ({style: 0.4, detail: 1.1}, ["style:0.4,detail:1.1"]),
                "none": ({}, [])}
    core = EngineCore(engines.root, [METHODS["sdedit"]], ["text_encoder", "vae_encoder", "vae_decoder", "unet",
                                                          "tokenize", "image_preprocess", "image_postprocess"],
                      CoreOptions(active=3, adapters=(("style", str(style)), ("detail", str(detail)))))
    core.load()
    core.scheduler.CPU_LANES = 1  # one tick at a time: the three loops' UNet steps all merge
    core.scheduler.max_wait_s = 5.0  # a tick waits for every active loop: on a starved CPU, 10 ms let them drift
    results: dict[str, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(requests))

    def run(name: str) -> None:
        try:
            start.wait()
            out = core.run_method("sdedit", {"image": example_image, "prompt": "a watercolor", "strength": 0.6,
                                             "steps": 5, "seed": 4, "lora": tuple(requests[name][1])},
                                  "png", ["pixels"], token=name)
            results[name] = out["pixels"][0]
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(name,)) for name in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    core.close()
    assert not errors, errors
    merged = [(calls, samples) for (model, _, calls, samples), n in core.scheduler.executions.items()
              if model == "unet" and calls > 1]
    assert merged and max(calls for calls, _ in merged) == 3, core.scheduler.executions
    for name, (chosen, _) in requests.items():
        expected = _expected_sdedit(sd_model, chosen, example_image, seed=4)
        error = max_abs(results[name] / 255.0, expected)
        print(f"sdedit {name} batched with the others: max |Δ| = {error:.2e}")
        assert error <= TOLERANCE + 1 / 255, name  # + the uint8 rounding of the served pixels


@pytest.fixture(scope="module")
def adapter_server(engines, lora_adapters, tmp_path_factory):
    style, detail = lora_adapters
    root = tmp_path_factory.mktemp("adapter-server")
    repository = write_repository(engines, root / "repository", models=["tokenize", "text_encoder", "vae_encoder",
                                                                      "vae_decoder", "unet", "image_preprocess",
                                                                      "image_postprocess"],
                                  methods=["txt2img"],
                                  core_options=CoreOptions(adapters=(("style", str(style)), ("detail", str(detail)))))
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


def test_served_requests_name_registered_adapters(adapter_server, sd_model, lora_adapters):
    style, detail = lora_adapters
    expected = _expected_txt2img(sd_model, {style: 0.7, detail: 0.5}, seed=5)
    got = run_remote(f"grpc://{adapter_server.grpc_url}", METHODS["txt2img"], progress=False, prompt=PROMPT, steps=4,
                     seed=5, lora=["style:0.7", "detail:0.5"])
    assert max_abs(np.asarray(got.image) / 255.0, expected) <= TOLERANCE + 1 / 255
    with pytest.raises(InvalidInputError, match="unknown LoRA 'sketch'.*detail, style"):
        run_remote(f"grpc://{adapter_server.grpc_url}", METHODS["txt2img"], progress=False, prompt=PROMPT, steps=2,
                   lora=["sketch"])
    with pytest.raises(InvalidInputError, match="unknown LoRA"):  # a server never reads a client's path
        run_remote(f"http://{adapter_server.http_url}", METHODS["txt2img"], progress=False, prompt=PROMPT, steps=2,
                   lora=[str(style)])
    again = run_remote(f"grpc://{adapter_server.grpc_url}", METHODS["txt2img"], progress=False, prompt=PROMPT,
                       steps=4, seed=5, lora=["style:0.7", "detail:0.5"])
    assert np.array_equal(np.asarray(again.image), np.asarray(got.image))  # nothing else disturbed


def test_bad_adapters_are_one_clear_error(engines, sd_model, svd_model, lora_adapters, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    style, _ = lora_adapters
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    lora = write_random_lora(sd_model, tmp_path / "ok", 5, text_encoder=False)
    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    (tmp_path / "other").mkdir()  # an adapter of another base model: its A matrices of wider layers
    save_file({k: torch.randn(v.shape[0], v.shape[1] * 2) if "lora_A" in k or "lora.down" in k else v
               for k, v in weights.items()}, tmp_path / "other" / "pytorch_lora_weights.safetensors")
    cases = [(str(tmp_path / "missing.safetensors"), "no such file"),
             (str(tmp_path / "garbage.safetensors"), "not a LoRA file"),
             (str(tmp_path / "other"), "does not fit this model's unet"),
             (f"{style}:inf", "finite")]
    with InProcessRunner(engines.root) as runner:
        for lora, words in cases:
            with pytest.raises(InvalidInputError, match=words):
                txt2img(runner, PROMPT, steps=2, progress=False, lora=[lora])
    image = tmp_path / "x.png"
    assert main(["txt2img", "--engines", str(engines.root), "--prompt", "x", "--steps", "2", "--out", str(image),
                 "--lora", str(tmp_path / "other"), "--quiet"]) == 2
    assert "does not fit" in capsys.readouterr().err and not image.exists()
    assert main(["serve", "--engines", str(engines.root), "--lora", f"bad={tmp_path / 'garbage.safetensors'}"]) == 2
    assert "not a LoRA file" in capsys.readouterr().err
    assert main(["serve", "--engines", str(engines.root), "--lora", str(style)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err


def test_the_cli_takes_repeated_adapters(engines, sd_model, lora_adapters, tmp_path):
    style, detail = lora_adapters
    out = tmp_path / "cat.png"
    assert main(["txt2img", "--engines", str(engines.root), "--prompt", PROMPT, "--steps", "4", "--seed", "3",
                 "--out", str(out), "--lora", f"{style}:0.7", "--lora", f"{detail}:0.5", "--quiet"]) == 0
    from PIL import Image

    expected = _expected_txt2img(sd_model, {style: 0.7, detail: 0.5})
    assert max_abs(np.asarray(Image.open(out)) / 255.0, expected) <= TOLERANCE + 1 / 255


def test_a_kohya_file_gives_what_its_diffusers_twin_gives(engines, lora_adapters, tmp_path):
    """The same adapter in kohya's key format (what A1111 users have: `lora_unet_…` keys with `.alpha`), read
    through diffusers' converter, is the same update per request."""
    from safetensors.torch import load_file, save_file

    _, detail = lora_adapters
    weights = load_file(detail / "pytorch_lora_weights.safetensors")
    kohya = {}
    for key, value in weights.items():
        path, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
        name = "lora_unet_" + path.replace(".", "_")
        kohya[f"{name}.lora_{kind.split('.')[0]}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(float(value.shape[0] if kind.startswith("down") else value.shape[1]))
    save_file(kohya, tmp_path / "detail_kohya.safetensors")
    with InProcessRunner(engines.root) as runner:
        diffusers_format = txt2img(runner, PROMPT, steps=3, seed=4, progress=False, lora=[f"{detail}:0.6"])
        kohya_format = txt2img(runner, PROMPT, steps=3, seed=4, progress=False,
                               lora=[f"{tmp_path / 'detail_kohya.safetensors'}:0.6"])
    assert max_abs(kohya_format.array, diffusers_format.array) <= 1e-5


def test_the_cli_registers_served_adapters_by_name(engines, lora_adapters, tmp_path, monkeypatch):
    """`ti2i repository|serve --lora NAME=PATH`: the core's options carry each name with its absolute path."""
    import json

    from ti2i.triton_models.repository import parse_config

    style, detail = lora_adapters
    monkeypatch.chdir(style.parent)
    repo = tmp_path / "repo"
    assert main(["repository", "--engines", str(engines.root), "--out", str(repo), "--methods", "txt2img",
                 "--lora", f"style={style.name}", "--lora", f"detail={detail}"]) == 0
    options = json.loads(parse_config(repo / "core" / "config.pbtxt").parameters["options"].string_value)
    assert options["adapters"] == [["style", str(style.resolve())], ["detail", str(detail.resolve())]]
