"""LoRA adapters fused at export (`ti2i export --lora PATH[:SCALE]`) give diffusers' result with the adapters
loaded (`load_lora_weights` + `set_adapters`), seed for seed.

The adapters are random (peft, `init_lora_weights=False`) on the tiny SD model: one on the UNet and the text
encoder, one on the UNet only, saved as `save_lora_weights` writes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import max_abs
from diffusers import StableDiffusionPipeline
from ti2i.app.cli import main
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.txt2img import txt2img
from ti2i.errors import InvalidInputError
from ti2i.export.exporter import export_model
from ti2i.export.tiny import LCM_TARGETS, write_random_lora
from ti2i.manifest import Manifest

TOLERANCE = 2 / 255  # max |Δ| on the [0, 1] image (the bound; fusing reorders float sums)
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def fused(sd_model, lora_adapters, tmp_path_factory) -> Manifest:
    style, detail = lora_adapters
    return export_model(str(sd_model), tmp_path_factory.mktemp("fused") / "engines", log=lambda _: None,
                        loras=[f"{style}:0.7", f"{detail}:0.5"])


def _reference(sd_model: Path, adapters: dict[Path, float]) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_model), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for index, path in enumerate(adapters):
        pipe.load_lora_weights(str(path), adapter_name=f"a{index}")
    pipe.set_adapters([f"a{i}" for i in range(len(adapters))], adapter_weights=list(adapters.values()))
    return pipe


def test_fused_adapters_match_diffusers_with_them_loaded(fused, sd_model, lora_adapters, engines):
    style, detail = lora_adapters
    pipe = _reference(sd_model, {style: 0.7, detail: 0.5})
    expected = pipe("a photo of a cat", num_inference_steps=6, guidance_scale=7.5,
                    generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    with InProcessRunner(fused.root) as runner:
        got = txt2img(runner, "a photo of a cat", steps=6, guidance=7.5, seed=3, progress=False)
    with InProcessRunner(engines.root) as runner:
        plain = txt2img(runner, "a photo of a cat", steps=6, guidance=7.5, seed=3, progress=False)
    error = max_abs(got.array, expected)
    print(f"txt2img with two fused adapters: max |Δ| = {error:.2e}")
    assert error <= TOLERANCE
    assert max_abs(plain.array, expected) > 10 * TOLERANCE  # the adapters matter
    assert f"lora {style}:0.7" in fused.sources["sd"] and f"lora {detail}:0.5" in fused.sources["sd"]
    for name in ("text_encoder", "unet"):  # both carry an adapter's update; the VAE none
        assert fused.components[name].fingerprint != engines.components[name].fingerprint, name
    assert fused.components["vae_decoder"].fingerprint == engines.components["vae_decoder"].fingerprint


def test_a_fused_adapter_reaches_every_method_on_the_unet(fused, sd_model, lora_adapters, example_image):
    style, _ = lora_adapters
    pipe = _reference(sd_model, {style: 1.0})
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    expected = img2img("a watercolor", image=example_image, strength=0.6, num_inference_steps=5,
                       generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    engines = export_model(str(sd_model), fused.root.parent / "style-only", log=lambda _: None, loras=[str(style)])
    with InProcessRunner(engines.root) as runner:
        got = sdedit(runner, example_image, "a watercolor", strength=0.6, steps=5, seed=4, progress=False)
    assert max_abs(got.array, expected) <= TOLERANCE


def test_bad_adapters_are_one_clear_error(sd_model, svd_model, lora_adapters, tmp_path, capsys):
    style, _ = lora_adapters
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    cases = [([str(tmp_path / "missing.safetensors")], "does not exist"),
             ([f"{style}:strong"], "scale"),
             ([str(tmp_path / "garbage.safetensors")], "not a LoRA file")]
    for loras, words in cases:
        with pytest.raises(InvalidInputError, match=words):
            export_model(str(sd_model), tmp_path / "out", log=lambda _: None, loras=loras)
    with pytest.raises(InvalidInputError, match="not a 'svd' model"):
        export_model(str(svd_model), tmp_path / "out-svd", log=lambda _: None, loras=[str(style)])
    assert main(["export", "--model", str(sd_model), "--out", str(tmp_path / "cli"), "--lora",
                 str(tmp_path / "missing.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_an_adapter_of_another_base_model_is_refused(sd_model, tmp_path):
    """An adapter whose matrices do not fit this UNet's layers (another base model: here a rank-4 update of a
    wider layer) is refused, naming the component, and no UNet engine is written."""
    from safetensors.torch import load_file, save_file

    lora = write_random_lora(sd_model, tmp_path / "ok", 5, text_encoder=False)
    weights = load_file(lora / "pytorch_lora_weights.safetensors")
    wider = {k: (torch.randn(v.shape[0], v.shape[1] * 2) if "lora_A" in k or "lora.down" in k else v)
             for k, v in weights.items()}
    (tmp_path / "other").mkdir()
    save_file(wider, tmp_path / "other" / "pytorch_lora_weights.safetensors")
    with pytest.raises(InvalidInputError, match="does not fit"):
        export_model(str(sd_model), tmp_path / "out", log=lambda _: None, loras=[str(tmp_path / "other")])
    assert not (tmp_path / "out" / "unet.onnx").exists()


def test_a_fused_lcm_style_adapter_runs_few_step_with_the_lcm_scheduler(sd_model, tmp_path):
    """LCM-LoRA's recipe: an adapter on the ResNets' convolutions and time projections too (which only fusing
    takes), the LCM scheduler, 4 steps, guidance 1.5: equal to diffusers with the same adapter and scheduler."""
    from diffusers import LCMScheduler

    lcm = write_random_lora(sd_model, tmp_path / "lcm", 7, text_encoder=False, unet_targets=LCM_TARGETS)
    pipe = _reference(sd_model, {lcm: 1.0})
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.5,
                    generator=torch.Generator("cpu").manual_seed(8), output_type="np").images[0]
    engines = export_model(str(sd_model), tmp_path / "engines", log=lambda _: None, loras=[str(lcm)])
    with InProcessRunner(engines.root) as runner:
        got = txt2img(runner, PROMPT, steps=4, guidance=1.5, seed=8, scheduler="lcm", progress=False)
    assert max_abs(got.array, expected) <= TOLERANCE
    with InProcessRunner(engines.root) as runner, pytest.raises(InvalidInputError, match="ti2i export --lora"):
        txt2img(runner, PROMPT, steps=2, progress=False, lora=[str(lcm)])  # per request: attention blocks only
