"""Engines: inputs are checked against the declaration with clear errors; valid calls return the declared
outputs; specs are plain JSON; the processing steps match diffusers' and the CLIP tokenizer's numbers."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from ti2i.engines.base import Engine
from ti2i.engines.loader import load_engine
from ti2i.engines.processing import to_model_range, to_unit_range
from transformers import CLIPTokenizer

from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.manifest import Manifest
from ti2i.spec import BATCH, ComponentSpec, TensorSpec, sample_inputs

SIZES = {BATCH: 2, "frames": 2, "image_height": 72, "image_width": 40, "height": 9, "width": 5, "lora_rank": 3}
PROMPTS = ["a photo of a cat", "", "the dog and the cat in the photo " * 20, "Ünïcode ✓ and   spaces"]


def _resolve(shape, sizes) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else sizes[d] for d in shape)


def _valid_inputs(spec: ComponentSpec, sizes=SIZES, seed: int = 0) -> dict[str, np.ndarray]:
    if spec.name == "tokenize":
        return {"text": np.array(PROMPTS[: sizes[BATCH]], dtype=object)}
    return sample_inputs(spec, sizes, seed=seed)


@pytest.fixture(scope="module")
def engine_of(sd_engines: Manifest):
    loaded: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in loaded:
            loaded[name] = load_engine(sd_engines, name, threads=2)
        return loaded[name]

    yield get
    for engine in loaded.values():
        engine.close()


# --- input validation -------------------------------------------------------------------------------

def _unet_inputs(batch: int = 2, height: int = 8, width: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, height, width)).astype(np.float32),
        "timestep": np.full((batch,), 500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32)).astype(np.float32),
    }


def _renamed(inputs, old, new):
    inputs[new] = inputs.pop(old)
    return inputs


def _with(name: str, make: Callable[[np.ndarray], object]):
    def mutate(inputs):
        inputs[name] = make(inputs[name])
        return inputs

    return mutate


# case -> (mutation of valid UNet inputs, substrings the message must contain, expected regex, got regex)
UNET_CASES: dict[str, tuple[Callable, tuple[str, ...], str, str]] = {
    "wrong_name": (lambda i: _renamed(i, "sample", "samples"), ("unet", "'sample'", "'samples'"), "sample", "samples"),
    "missing_input": (lambda i: (i.pop("timestep"), i)[1], ("unet", "timestep"), "timestep", "encoder_hidden_states"),
    "extra_input": (lambda i: {**i, "guidance": np.ones((2,), np.float32)}, ("unet", "guidance"), "sample",
                    "guidance"),
    "wrong_dtype_float64": (_with("sample", lambda a: a.astype(np.float64)), ("unet.sample",), "float32", "float64"),
    "wrong_dtype_int_timestep": (_with("timestep", lambda a: a.astype(np.int64)), ("unet.timestep",), "float32",
                                 "int64"),
    "not_an_array": (_with("timestep", lambda a: a.tolist()), ("unet.timestep",), "array", "list"),
    "wrong_rank": (_with("sample", lambda a: a[0]), ("unet.sample",), r"\b4\b", r"\(4, 8, 6\)"),
    "scalar_timestep": (_with("timestep", lambda a: np.array(500.0, dtype=np.float32)), ("unet.timestep",),
                        r"\b1\b", r"\(\)"),
    "height_above_range": (lambda i: _unet_inputs(height=257), ("unet.sample", "height"), r"256", r"257"),
    "batch_above_range": (lambda i: _unet_inputs(batch=33), ("unet.sample", "batch"), r"\b32\b", r"\b33\b"),
    "empty_batch": (lambda i: _unet_inputs(batch=0), ("unet.sample", "batch"), r"\b1\b", r"\b0\b"),
    "fixed_channels_wrong": (_with("sample", lambda a: a[:, :3]), ("unet.sample",), r"\b4\b", r"\b3\b"),
    "fixed_sequence_wrong": (_with("encoder_hidden_states", lambda a: a[:, :76]), ("unet.encoder_hidden_states",),
                             r"\b77\b", r"\b76\b"),
    "batch_mismatch": (_with("encoder_hidden_states", lambda a: np.concatenate([a, a[:1]])),
                       ("unet.encoder_hidden_states", "batch"), r"\b2\b", r"\b3\b"),
}


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_rejects_bad_inputs_naming_tensor_expected_and_got(engine_of, case: str):
    mutate, names, expected, got = UNET_CASES[case]
    with pytest.raises(InvalidInputError) as info:
        engine_of("unet").run(mutate(_unet_inputs()))
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert re.search(expected, message), f"expected value {expected!r} not in {message!r}"
    assert re.search(got, message), f"got value {got!r} not in {message!r}"
    assert isinstance(info.value, ValueError)  # the CLI and the Triton models map it to a usage error


PROCESSING_CASES = {
    # step, inputs, substrings, expected regex, got regex
    "preprocess_float_image": ("image_preprocess", {"image": np.zeros((1, 16, 16, 3), np.float32)},
                               ("image_preprocess.image",), "uint8", "float32"),
    "preprocess_rgba": ("image_preprocess", {"image": np.zeros((1, 16, 16, 4), np.uint8)},
                        ("image_preprocess.image",), r"\b3\b", r"\b4\b"),
    "preprocess_unbatched": ("image_preprocess", {"image": np.zeros((16, 16, 3), np.uint8)},
                             ("image_preprocess.image",), r"\b4\b", r"\(16, 16, 3\)"),
    "preprocess_too_small": ("image_preprocess", {"image": np.zeros((1, 4, 16, 3), np.uint8)},
                             ("image_preprocess.image", "image_height"), r"\b8\b", r"\b4\b"),
    "postprocess_too_large": ("image_postprocess", {"images": np.zeros((1, 3, 16, 2056), np.float32)},
                              ("image_postprocess.images", "image_width"), r"\b2048\b", r"\b2056\b"),
    "postprocess_channels_last": ("image_postprocess", {"images": np.zeros((1, 16, 16, 3), np.float32)},
                                  ("image_postprocess.images",), r"\b3\b", r"\b16\b"),
    "tokenize_numbers": ("tokenize", {"text": np.arange(2)}, ("tokenize.text",), "object", "int64"),
    "tokenize_rank_2": ("tokenize", {"text": np.array([["a", "b"]], dtype=object)}, ("tokenize.text",), r"\b1\b",
                        r"\(1, 2\)"),
    "tokenize_wrong_name": ("tokenize", {"prompt": np.array(["a"], dtype=object)}, ("tokenize", "text", "prompt"),
                            "text", "prompt"),
    "tokenize_bad_utf8": ("tokenize", {"text": np.array([b"\xff\xfe"], dtype=object)}, ("tokenize.text",),
                          "UTF-8", "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(PROCESSING_CASES))
def test_processing_steps_reject_bad_inputs(engine_of, case: str):
    step, inputs, names, expected, got = PROCESSING_CASES[case]
    with pytest.raises(InvalidInputError) as info:
        engine_of(step).run(inputs)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"
    assert re.search(expected, message) and re.search(got, message), message


def test_unknown_component_is_model_not_found(sd_engines: Manifest):
    with pytest.raises(ModelNotFoundError, match="no_such_component"):
        load_engine(sd_engines, "no_such_component")


def test_onnx_runtime_threads_do_not_spin_unless_asked(sd_engines: Manifest, monkeypatch: pytest.MonkeyPatch):
    """Spinning intra-op threads starve a loop's own work between calls (2x slower tiny SDEdit): off by default."""
    def allow_spinning(engine) -> str:
        try:
            return engine.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        except RuntimeError:  # no entry: ONNX Runtime's default, spinning
            return "1"

    monkeypatch.delenv("TI2I_ORT_SPINNING", raising=False)
    for name in ("unet", "text_encoder"):
        engine = load_engine(sd_engines, name)
        assert engine.spinning is False and allow_spinning(engine) == "0"
    monkeypatch.setenv("TI2I_ORT_SPINNING", "1")
    engine = load_engine(sd_engines, "unet")
    assert engine.spinning is True and allow_spinning(engine) == "1"


# --- valid calls ------------------------------------------------------------------------------------

def test_every_engine_returns_declared_outputs(sd_engines: Manifest, engine_of):
    for name, entry in sd_engines.components.items():
        spec = entry.spec
        engine = engine_of(name)
        assert engine.name == name and engine.spec == spec
        bound = spec.validate_inputs(_valid_inputs(spec))
        assert bound == {d: SIZES[d] for d in bound}
        if spec.batched:
            assert bound[BATCH] == SIZES[BATCH]
        out = engine.run(_valid_inputs(spec))
        assert list(out) == [t.name for t in spec.outputs], name
        for tensor in spec.outputs:
            value = out[tensor.name]
            assert isinstance(value, np.ndarray), (name, tensor.name)
            assert value.shape == _resolve(tensor.shape, SIZES), (name, tensor.name, value.shape)
            assert value.dtype == np.dtype(tensor.dtype), (name, tensor.name, value.dtype)
            if value.dtype.kind == "f":
                assert np.isfinite(value).all(), (name, tensor.name)


def test_unet_runs_at_batch_and_size_bounds(engine_of):
    for batch, height, width in ((1, 1, 1), (32, 3, 2), (1, 9, 5)):
        out = engine_of("unet").run(_unet_inputs(batch, height, width))
        assert out["noise_pred"].shape == (batch, 4, height, width)


# --- specs: JSON and sample inputs ------------------------------------------------------------------

def test_component_spec_json_round_trip_is_lossless(sd_engines: Manifest):
    hand_made = ComponentSpec(
        name="custom",
        inputs=(TensorSpec("ids", "int32", ("batch", 7), (0, 99)), TensorSpec("flag", "bool", (3,), (0.0, 2.0)),
                TensorSpec("text", "object", ("n",))),
        outputs=(TensorSpec("y", "float16", ("n", "batch", 2)),),
        dims={"batch": (1, 4), "n": (2, 9)},
        batched=False,
    )
    loaded = Manifest.load(sd_engines.root)
    for spec in [hand_made, *(e.spec for e in sd_engines.components.values())]:
        data = json.loads(json.dumps(spec.to_json()))
        again = ComponentSpec.from_json(data)
        assert again == spec, spec.name
        assert again.to_json() == spec.to_json()
        assert all(isinstance(t.shape, tuple) for t in (*again.inputs, *again.outputs))
        assert again.max_batch == spec.max_batch
        if spec.name in loaded.components:
            assert loaded.components[spec.name].spec == spec


@pytest.mark.parametrize("which", ["low", "typical"])
def test_sample_inputs_respect_ranges_and_dtypes(sd_engines: Manifest, which: str):
    for name, entry in sd_engines.components.items():
        spec = entry.spec
        if any(t.dtype == "object" for t in spec.inputs):
            continue  # text inputs: see the valid-call test
        sizes = {d: low for d, (low, _) in spec.dims.items()} if which == "low" else dict(SIZES)
        if which == "low" and "image_height" in spec.dims and "height" in spec.dims:
            scale = sd_engines.pipeline["vae_scale_factor"]
            sizes["image_height"], sizes["image_width"] = sizes["height"] * scale, sizes["width"] * scale
        inputs = sample_inputs(spec, sizes, seed=3)
        assert list(inputs) == [t.name for t in spec.inputs]
        spec.validate_inputs(inputs)  # within every declared dimension range
        for tensor in spec.inputs:
            value = inputs[tensor.name]
            assert value.dtype == np.dtype(tensor.dtype), (name, tensor.name)
            assert value.shape == _resolve(tensor.shape, sizes), (name, tensor.name)
            low, high = tensor.sample_range
            assert value.min() >= low, (name, tensor.name)
            if value.dtype.kind in "iu":
                assert value.max() < high, (name, tensor.name)
            else:
                assert value.max() <= high, (name, tensor.name)
        # Same seed, same values; another seed, other values.
        again = sample_inputs(spec, sizes, seed=3)
        assert all(np.array_equal(inputs[k], again[k]) for k in inputs)
        other = sample_inputs(spec, sizes, seed=4)
        assert any(not np.array_equal(inputs[k], other[k]) for k in inputs if inputs[k].size > 1)


def test_sample_inputs_of_the_unet_cover_its_declared_value_ranges(sd_engines: Manifest):
    spec = sd_engines.components["unet"].spec
    inputs = sample_inputs(spec, {BATCH: 32, "height": 16, "width": 16}, seed=0)
    assert spec.input("timestep").sample_range == (0.0, 1000.0)
    assert inputs["timestep"].min() >= 0.0 and inputs["timestep"].max() <= 1000.0
    assert inputs["timestep"].max() > 500.0  # drawn across the range, not squeezed into [-1, 1]
    ids = sample_inputs(sd_engines.components["text_encoder"].spec, {BATCH: 16}, seed=0)["input_ids"]
    vocab = sd_engines.components["text_encoder"].spec.input("input_ids").sample_range[1]
    assert ids.min() >= 0 and ids.max() < vocab and ids.max() > vocab // 2


def test_sample_inputs_of_text_tensors_are_strings(sd_engines: Manifest, engine_of):
    """``object`` tensors hold text: their samples must be strings the tokenize step accepts, not numbers."""
    spec = sd_engines.components["tokenize"].spec
    inputs = sample_inputs(spec, {BATCH: 3}, seed=0)
    assert inputs["text"].shape == (3,)
    spec.validate_inputs(inputs)
    assert all(isinstance(v, (str, bytes)) for v in inputs["text"].ravel()), inputs["text"]
    assert engine_of("tokenize").run(inputs)["input_ids"].shape == (3, 77)


# --- processing steps match diffusers and the CLIP tokenizer -----------------------------------------

def _random_images(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)


def test_image_preprocess_matches_vae_image_processor(engine_of, example_image: Image.Image):
    processor = VaeImageProcessor(vae_scale_factor=8, do_resize=False)
    for images in (np.asarray(example_image)[None], _random_images(3, 40, 72)):
        pils = [Image.fromarray(i) for i in images]
        expected = processor.preprocess(pils).numpy()
        got = engine_of("image_preprocess").run({"image": images})["images"]
        assert got.dtype == np.float32 and got.shape == expected.shape == (len(images), 3, *images.shape[1:3])
        assert np.array_equal(got, expected)
        assert np.array_equal(to_model_range(images), expected)
    extremes = np.array([[[[0, 255, 128]]]], dtype=np.uint8)
    assert to_model_range(extremes).ravel().tolist() == [-1.0, 1.0, pytest.approx(2 * 128 / 255 - 1, abs=1e-6)]


def _postprocess_inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    images = rng.uniform(-1.3, 1.3, size=(2, 3, 16, 24)).astype(np.float32)  # beyond [-1, 1]: clamped
    # Values whose 8-bit conversion lands exactly on or next to a rounding boundary.
    k = np.arange(256, dtype=np.float32)
    edges = np.concatenate([(k + 0.5) / 255.0, k / 255.0, np.nextafter((k + 0.5) / 255.0, 0)]).astype(np.float32)
    edges = edges * 2.0 - 1.0
    flat = images.reshape(-1)
    flat[: edges.size] = edges
    flat[edges.size: edges.size + 4] = [-1.0, 1.0, 0.0, np.float32(-0.0)]
    return images


def test_image_postprocess_matches_vae_image_processor(engine_of):
    images = _postprocess_inputs()
    processor = VaeImageProcessor(vae_scale_factor=8)
    expected_float = processor.postprocess(torch.from_numpy(images.copy()), output_type="np")
    expected_uint8 = np.stack([np.asarray(p) for p in processor.postprocess(torch.from_numpy(images.copy()),
                                                                             output_type="pil")])
    out = engine_of("image_postprocess").run({"images": images})
    assert out["image"].dtype == np.uint8 and out["image"].shape == (2, 16, 24, 3)
    assert np.array_equal(out["image"], expected_uint8)  # numpy_to_pil's rounding, bit for bit
    assert out["image_float"].dtype == np.float32
    assert np.array_equal(out["image_float"], expected_float)
    uint8, unit = to_unit_range(images)
    assert np.array_equal(uint8, expected_uint8) and np.array_equal(unit, expected_float)
    assert np.array_equal(np.stack([np.asarray(p) for p in VaeImageProcessor.numpy_to_pil(expected_float)]), uint8)


def test_tokenize_matches_clip_tokenizer_padded_to_77(engine_of, sd_model: Path):
    tokenizer = CLIPTokenizer.from_pretrained(str(sd_model), subfolder="tokenizer")
    expected = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="np").input_ids
    assert expected.shape == (len(PROMPTS), 77)
    for text in (np.array(PROMPTS, dtype=object), np.array(PROMPTS),
                 np.array([p.encode("utf-8") for p in PROMPTS], dtype=object)):
        got = engine_of("tokenize").run({"text": text})["input_ids"]
        assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
        assert np.array_equal(got, expected)
    # Short prompts are padded with the pad id after EOS; long ones are truncated to 77 ending in EOS.
    assert expected[0, 0] == tokenizer.bos_token_id
    assert expected[0, -1] == tokenizer.pad_token_id
    assert expected[2, -1] == tokenizer.eos_token_id
