"""The generated Triton model repository: one python model per component, one ensemble per fixed chain,
every config.pbtxt valid under Triton's own ModelConfig schema and consistent with the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from ti2i.engines.ensembles import ENSEMBLES
from ti2i.triton_models.repository import ENTRY_FILE, write_repository
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.manifest import PIPELINE_PARAMETER, Manifest
from ti2i.spec import BATCH, TRITON_DTYPES, TensorSpec

ENSEMBLE_STEPS = {
    "encode_prompt": ("tokenize", "text_encoder"),
    "encode_image": ("image_preprocess", "vae_encoder"),
    "decode_image": ("vae_decoder", "image_postprocess"),
}
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
                "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL", "object": "TYPE_STRING"}


def _parse(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _configs(root: Path) -> dict[str, mc.ModelConfig]:
    return {d.name: _parse(d / "config.pbtxt") for d in sorted(root.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def repository(sd_engines: Manifest, tmp_path_factory) -> Path:
    return write_repository(sd_engines, tmp_path_factory.mktemp("repo") / "repository")


@pytest.fixture(scope="module")
def configs(repository: Path) -> dict[str, mc.ModelConfig]:
    return _configs(repository)


def _expected_dims(tensor: TensorSpec, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in tensor.shape]
    if batched:
        assert tensor.shape[0] == BATCH
        dims = dims[1:]
    return dims


def test_one_folder_per_component_and_per_ensemble(sd_engines: Manifest, repository: Path):
    folders = {d.name for d in repository.iterdir()}
    chains = {e.name for e in ENSEMBLES if all(step in sd_engines.components for step in e.steps)}
    assert set(ENSEMBLE_STEPS) <= chains
    assert folders == set(sd_engines.components) | chains | {"core"}
    assert {e.name: e.steps for e in ENSEMBLES if e.name in ENSEMBLE_STEPS} == ENSEMBLE_STEPS
    for folder in repository.iterdir():
        assert (folder / "config.pbtxt").is_file(), folder.name
        assert (folder / "1").is_dir(), folder.name


def test_every_config_parses_with_tritons_schema(repository: Path, configs):
    assert configs, "no configs"
    for name, config in configs.items():
        assert config.name == name
        # Parsing is strict (unknown fields fail); printing it back and parsing again is stable.
        again = text_format.Parse(text_format.MessageToString(config), mc.ModelConfig())
        assert again == config


def test_component_models_match_their_specs_and_forward_to_the_core(sd_engines: Manifest, repository: Path, configs):
    model_code = ENTRY_FILE.read_text()
    for name, entry in sd_engines.components.items():
        spec, config = entry.spec, configs[name]
        assert config.backend == "python" and config.platform == "", name
        assert config.max_batch_size == spec.max_batch, name
        if spec.batched:  # clients send batches; the core merges the calls of every caller
            assert spec.max_batch == spec.dims[BATCH][1] > 0, name
        else:
            assert config.max_batch_size == 0, name
        assert not config.HasField("dynamic_batching"), name  # the core bounds and batches, not Triton
        assert config.parameters["core"].string_value == "core"
        assert (repository / name / "1" / "model.py").read_text() == model_code
        assert len(config.instance_group) >= 1 and all(g.count >= 1 for g in config.instance_group)
        assert config.parameters["component"].string_value == name
        assert Path(config.parameters["engine_dir"].string_value) == sd_engines.root
        for tensors, declared in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in tensors] == [t.name for t in declared], name
            for got, tensor in zip(tensors, declared):
                where = f"{name}.{tensor.name}"
                assert mc.DataType.Name(got.data_type) == TRITON_TYPES[tensor.dtype], where
                assert TRITON_DTYPES[tensor.dtype] == TRITON_TYPES[tensor.dtype][len("TYPE_"):]
                dims = _expected_dims(tensor, spec.batched)
                if dims:
                    assert list(got.dims) == dims and not got.HasField("reshape"), where
                else:  # a per-sample scalar travels as [1] and reaches the model as []
                    assert list(got.dims) == [1] and got.HasField("reshape") and list(got.reshape.shape) == [], where


def test_timestep_is_dims_1_reshaped_to_scalar(configs):
    for name in ("unet", "unet_pix2pix", "unet_inpaint"):
        if name not in configs:
            continue
        timestep = next(i for i in configs[name].input if i.name == "timestep")
        assert timestep.data_type == mc.TYPE_FP32
        assert list(timestep.dims) == [1]
        assert timestep.HasField("reshape") and list(timestep.reshape.shape) == []
    assert "unet" in configs


def test_unet_batches_the_most(sd_engines: Manifest, configs):
    assert configs["unet"].max_batch_size == sd_engines.components["unet"].spec.max_batch
    assert configs["unet"].max_batch_size >= configs["text_encoder"].max_batch_size


def _io(config: mc.ModelConfig) -> tuple[dict, dict]:
    return {t.name: t for t in config.input}, {t.name: t for t in config.output}


def test_ensembles_chain_their_steps_in_order(configs):
    for name, steps in ENSEMBLE_STEPS.items():
        ensemble = configs[name]
        assert ensemble.platform == "ensemble" and ensemble.backend == "", name
        scheduled = ensemble.ensemble_scheduling.step
        assert [s.model_name for s in scheduled] == list(steps), name
        ens_inputs, ens_outputs = _io(ensemble)
        available = set(ens_inputs)  # tensors an ensemble step may read
        consumed: set[str] = set()
        for step in scheduled:
            model_inputs, model_outputs = _io(configs[step.model_name])
            required = {n for n, t in model_inputs.items() if not t.optional}  # optional: adapter inputs
            assert required <= set(step.input_map) <= set(model_inputs), (name, step.model_name)
            assert set(step.output_map) == set(model_outputs), (name, step.model_name)
            for model_tensor, ensemble_tensor in step.input_map.items():
                assert ensemble_tensor in available, (name, step.model_name, ensemble_tensor)
                consumed.add(ensemble_tensor)
                if ensemble_tensor in ens_inputs:  # same type and shape as the model expects
                    declared = ens_inputs[ensemble_tensor]
                    assert declared.data_type == model_inputs[model_tensor].data_type
                    assert list(declared.dims) == list(model_inputs[model_tensor].dims)
                    assert not declared.HasField("reshape")
            for model_tensor, ensemble_tensor in step.output_map.items():
                assert ensemble_tensor not in available, f"{name}: {ensemble_tensor} produced twice"
                available.add(ensemble_tensor)
                if ensemble_tensor in ens_outputs:
                    declared = ens_outputs[ensemble_tensor]
                    assert declared.data_type == model_outputs[model_tensor].data_type
                    assert list(declared.dims) == list(model_outputs[model_tensor].dims)
        assert set(ens_outputs) <= available - set(ens_inputs), name
        assert set(ens_inputs) <= consumed, f"{name}: unused ensemble inputs"
        unused = available - consumed - set(ens_outputs) - set(ens_inputs)
        assert not unused, f"{name}: step outputs neither consumed nor returned: {unused}"


def test_ensemble_interfaces(configs):
    prompt_in, prompt_out = _io(configs["encode_prompt"])
    assert set(prompt_in) == {"text"} and prompt_in["text"].data_type == mc.TYPE_STRING
    assert set(prompt_out) == {"text_embeddings"}
    image_in, image_out = _io(configs["encode_image"])
    assert set(image_in) == {"image"} and image_in["image"].data_type == mc.TYPE_UINT8
    assert list(image_in["image"].dims) == [-1, -1, 3]
    assert set(image_out) == {"latent_mean", "latent_logvar"}
    decode_in, decode_out = _io(configs["decode_image"])
    assert set(decode_in) == {"latent"}
    assert decode_out["image"].data_type == mc.TYPE_UINT8 and decode_out["image_float"].data_type == mc.TYPE_FP32


def test_ensemble_max_batch_no_larger_than_any_step(configs):
    for name, steps in ENSEMBLE_STEPS.items():
        ensemble = configs[name]
        assert ensemble.max_batch_size > 0, name
        assert ensemble.max_batch_size <= min(configs[s].max_batch_size for s in steps), name


def test_every_model_carries_the_pipeline_facts(sd_engines: Manifest, configs):
    on_disk = Manifest.load(sd_engines.root).pipeline
    for name, config in configs.items():
        assert PIPELINE_PARAMETER == "ti2i_pipeline"
        assert PIPELINE_PARAMETER in config.parameters, name
        facts = json.loads(config.parameters[PIPELINE_PARAMETER].string_value)
        assert facts == sd_engines.pipeline == on_disk, name


def test_model_subsets_leave_out_ensembles_whose_steps_are_missing(sd_engines: Manifest, tmp_path: Path):
    out = tmp_path / "repository"
    write_repository(sd_engines, out)
    # Writing again replaces the whole repository: nothing stale stays behind.
    write_repository(sd_engines, out, models=["tokenize", "text_encoder", "vae_decoder"])
    assert {d.name for d in out.iterdir()} == {"tokenize", "text_encoder", "vae_decoder", "encode_prompt", "core"}
    configs = _configs(out)
    assert [s.model_name for s in configs["encode_prompt"].ensemble_scheduling.step] == ["tokenize", "text_encoder"]

    write_repository(sd_engines, out, models=["unet"])
    assert {d.name for d in out.iterdir()} == {"unet", "core"}

    write_repository(sd_engines, out, models=["vae_decoder", "image_postprocess", "image_preprocess"])
    assert {d.name for d in out.iterdir()} == {"vae_decoder", "image_postprocess", "image_preprocess",
                                               "decode_image", "core"}


@pytest.mark.parametrize("where", ["engine_dir", "its_parent"])
def test_write_repository_never_deletes_the_engines(sd_engines: Manifest, tmp_path: Path, where: str):
    """The repository folder is replaced wholesale, so it must not be (or contain) the engine directory."""
    from ti2i.errors import Ti2iError

    engines = tmp_path / "parent" / "engines"
    shutil.copytree(sd_engines.root, engines)
    manifest = Manifest.load(engines)
    before = sorted(p.name for p in engines.iterdir())
    out = engines if where == "engine_dir" else engines.parent
    with pytest.raises(Ti2iError):
        write_repository(manifest, out)
    assert sorted(p.name for p in engines.iterdir()) == before
    assert Manifest.load(engines).components.keys() == sd_engines.components.keys()
