"""fp16 export: graphs traced from fp16 modules, validated against fp32, run behind the float32 interface."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from ti2i.client.images import psnr
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.svd import svd
from ti2i.client.txt2img import txt2img
from ti2i.export.components import COMPONENTS
from ti2i.export.exporter import export_model
from ti2i.export.fp16 import ALWAYS_FLOAT_INPUTS
from ti2i.triton_models.repository import parse_config, write_repository
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.errors import InvalidInputError
from ti2i.manifest import MANIFEST_NAME, ONNX, Manifest
from ti2i.spec import sample_inputs

MIN_PSNR_DB = 35.0
ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
              onnx.TensorProto.INT32: "int32"}


def _onnx_entries(manifest: Manifest):
    return {n: e for n, e in manifest.components.items() if e.backend == ONNX}


@pytest.mark.parametrize("engines_name", ["sd16_engines", "svd16_engines", "sdxl16_engines"])
def test_manifest_records_precision_and_error_against_fp32(engines_name, request):
    manifest: Manifest = request.getfixturevalue(engines_name)
    assert manifest.precision == "fp16"
    for name, entry in _onnx_entries(manifest).items():
        component = COMPONENTS[entry.declared_as]
        expected = "fp16" if component.fp16 else "fp32"
        assert entry.precision == expected == entry.validation["precision"], name
        assert entry.validation["reference"] == "torch fp32"
        tolerance = component.fp16_tolerance if expected == "fp16" else component.tolerance
        assert 0 < entry.validation["max_rel_error"] <= tolerance == entry.validation["tolerance"], name
    # SVD's temporal VAE decoder is declared fp32 (as NVIDIA's demo keeps it)
    if "vae_decoder_temporal" in manifest.components:
        assert manifest.components["vae_decoder_temporal"].precision == "fp32"
    # and SDXL's VAE (it overflows in fp16), as diffusers upcasts it
    if "tokenize_2" in manifest.components:
        assert {manifest.components[n].precision for n in ("vae_encoder", "vae_decoder")} == {"fp32"}
        assert {manifest.components[n].precision for n in ("text_encoder", "unet")} == {"fp16"}


@pytest.mark.parametrize("engines_name", ["sd16_engines", "svd16_engines", "sdxl16_engines"])
def test_graph_types_are_the_spec_dtypes(engines_name, request):
    """fp16 graphs hold float16 tensors at their boundary except the declared float32 inputs (the timestep)."""
    manifest: Manifest = request.getfixturevalue(engines_name)
    for name, entry in _onnx_entries(manifest).items():
        graph = onnx.load(str(manifest.path_of(name)))
        onnx.checker.check_model(graph)
        declared = {t.name: t.dtype for t in (*entry.spec.inputs, *entry.spec.outputs)}
        actual = {v.name: ONNX_TYPES[v.type.tensor_type.elem_type] for v in (*graph.graph.input, *graph.graph.output)}
        assert actual == declared, name
        if entry.precision == "fp16":
            floats = {n: d for n, d in declared.items() if d.startswith("float")}
            assert {n for n, d in floats.items() if d == "float32"} <= COMPONENTS[entry.declared_as].fp32_inputs, name
            assert "float16" in floats.values()
            weights = [i.data_type for i in graph.graph.initializer if i.data_type in ONNX_TYPES]
            assert onnx.TensorProto.FLOAT16 in weights and onnx.TensorProto.FLOAT not in weights, name
            # float32 inside only where the module computes in fp32 on purpose: the timestep embedding
            inferred = onnx.shape_inference.infer_shapes(graph)
            float_by_spec = {n.input[i] for n in inferred.graph.node for i in ALWAYS_FLOAT_INPUTS.get(n.op_type, ())
                             if i < len(n.input)}  # Resize scales are float32 by the ONNX spec
            fp32_values = [v.name for v in inferred.graph.value_info
                           if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and v.name not in float_by_spec]
            assert bool(fp32_values) == any(t.dtype == "float32" for t in entry.spec.inputs), (name, fp32_values)


def test_fp16_engines_take_and_return_float32(sd16_engines: Manifest, sd_engines: Manifest):
    """Methods exchange float32 with an fp16 engine; its outputs stay close to the fp32 engine's."""
    spec = sd_engines.components["unet"].spec
    inputs = sample_inputs(spec, {"batch": 2, "height": 8, "width": 6})
    with InProcessRunner(sd16_engines.root) as r16, InProcessRunner(sd_engines.root) as r32:
        half = r16.run("unet", **inputs)["noise_pred"]
        full = r32.run("unet", **inputs)["noise_pred"]
        decoded = r16.run("decode_image", latent=inputs["sample"][:1, :4])
    assert half.dtype == np.float32 and decoded["image_float"].dtype == np.float32
    rel = float(np.abs(half - full).max() / np.abs(full).max())
    print(f"\nunet fp16 vs fp32 engine: max relative difference {rel:.2e}")
    assert 0 < rel <= COMPONENTS["unet"].fp16_tolerance


def test_sdedit_on_fp16_engines_matches_fp32_engines(sd16_engines: Manifest, sd_engines: Manifest, example_image):
    def run(root: Path):
        with InProcessRunner(root) as runner:
            return sdedit(runner, example_image, "a painting", strength=0.8, steps=8, seed=3, progress=False).array

    full, half = run(sd_engines.root), run(sd16_engines.root)
    db = psnr(half, full)
    print(f"\nSDEdit tiny 64x48, 8 steps: fp16 engines vs fp32 engines PSNR {db:.1f} dB")
    assert not np.array_equal(half, full)  # really another graph
    assert db >= MIN_PSNR_DB


def test_sdxl_txt2img_on_fp16_engines_matches_fp32_engines(sdxl16_engines: Manifest, sdxl_engines: Manifest):
    def run(root: Path):
        with InProcessRunner(root) as runner:
            return txt2img(runner, "a lighthouse", steps=8, guidance=5.0, seed=3, height=48, width=64,
                           progress=False).array

    full, half = run(sdxl_engines.root), run(sdxl16_engines.root)
    db = psnr(half, full)
    print(f"\nSDXL txt2img tiny 64x48, 8 steps: fp16 engines vs fp32 engines PSNR {db:.1f} dB")
    assert not np.array_equal(half, full)
    assert db >= MIN_PSNR_DB


def test_fp16_graphs_over_the_size_limit_never_hold_their_weights_in_the_message(sd_model: Path, sd16_engines: Manifest,
                                                                                 tmp_path: Path, monkeypatch,
                                                                                 example_image):
    """protobuf refuses a message over 2 GB and an SDXL UNet is 4.8 GiB in fp16: above the threshold, the graph
    rewritten in fp16 keeps its weights in a file beside it from the start, and runs as the embedded one does."""
    from ti2i.export import exporter

    written: dict[str, tuple[int, int]] = {}  # per graph: bytes of the message and of its weights file
    finalise = exporter._finalise_onnx

    def observed(tmp: Path, raw: Path, path: Path) -> None:
        data = raw.with_name(raw.name + ".data")
        written[raw.stem] = (raw.stat().st_size, data.stat().st_size if data.is_file() else 0)
        finalise(tmp, raw, path)

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 1024)
    monkeypatch.setattr(exporter, "_finalise_onnx", observed)
    manifest = export_model(str(sd_model), tmp_path / "sd16", log=lambda _: None, precision="fp16")
    fp16 = [name for name, entry in _onnx_entries(manifest).items() if entry.precision == "fp16"]
    assert "unet" in fp16
    for name in fp16:
        message, data = written[name]
        assert data > 0, (name, written[name])  # the weights went to a file beside the message
        path = manifest.path_of(name)
        assert sorted(p.name for p in path.parent.glob(f"{name}.onnx*")) == [path.name, path.name + ".data"]

    def run(root: Path):
        with InProcessRunner(root) as runner:
            return sdedit(runner, example_image, "a painting", strength=0.8, steps=4, seed=3, progress=False).array

    assert np.array_equal(run(manifest.root), run(sd16_engines.root))


def test_an_fp16_safe_sdxl_vae_is_exported_in_fp16(sdxl_model: Path, tmp_path: Path):
    """The fp16-fix VAE says `force_upcast: false`: then the VAE is fp16 too, and the export says so."""
    model = tmp_path / "sdxl-vae-fix"
    shutil.copytree(sdxl_model, model)
    config = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    lines: list[str] = []
    manifest = export_model(str(model), tmp_path / "engines", log=lines.append, precision="fp16")
    assert {manifest.components[n].precision for n in ("vae_encoder", "vae_decoder", "unet")} == {"fp16"}
    assert "vae: fp16 (its config says force_upcast false: an fp16-safe VAE)" in lines


def test_svd_on_fp16_engines_matches_fp32_engines(svd16_engines: Manifest, svd_engines: Manifest, example_image):
    def run(root: Path):
        with InProcessRunner(root) as runner:
            return svd(runner, example_image, frames=4, steps=4, seed=3, height=48, width=64, progress=False).array

    full, half = run(svd_engines.root), run(svd16_engines.root)
    db = psnr(half, full)
    print(f"\nSVD tiny 4 frames 64x48, 4 steps: fp16 engines vs fp32 engines PSNR {db:.1f} dB")
    assert not np.array_equal(half, full)
    assert db >= MIN_PSNR_DB


def test_an_fp16_export_cannot_join_an_fp32_directory(sd_model: Path, sd_engines: Manifest, tmp_path: Path):
    root = tmp_path / "engines"
    shutil.copytree(sd_engines.root, root)
    with pytest.raises(InvalidInputError, match="holds fp32 engines"):
        export_model(str(sd_model), root, log=lambda _: None, precision="fp16")
    with pytest.raises(InvalidInputError, match="precision"):
        export_model(str(sd_model), tmp_path / "other", log=lambda _: None, precision="int8")


def test_python_backend_repository_of_fp16_engines_serves_float32(sd16_engines: Manifest, tmp_path: Path):
    """The python models host the engine, which casts: their configs (and ensembles) keep float32 tensors."""
    repo = write_repository(sd16_engines, tmp_path / "repository")
    for name in ("unet", "vae_decoder", "decode_image", "encode_prompt"):
        config = parse_config(repo / name / "config.pbtxt")
        types = {mc.DataType.Name(t.data_type) for t in (*config.input, *config.output)}
        assert "TYPE_FP32" in types and "TYPE_FP16" not in types, name


def test_manifests_without_opt_sizes_or_precision_still_load(sd16_engines: Manifest, tmp_path: Path):
    root = tmp_path / "engines"
    shutil.copytree(sd16_engines.root, root)
    data = json.loads((root / MANIFEST_NAME).read_text())
    for entry in data["components"].values():
        entry.pop("precision", None)
        entry["spec"].pop("opt", None)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    old = Manifest.load(root)
    for name, entry in old.components.items():
        assert entry.precision is None and not entry.spec.opt
        assert entry.spec.inputs == sd16_engines.components[name].spec.inputs


def test_fp16_engines_served_by_python_models_match_in_process(sd16_engines: Manifest, tmp_path: Path,
                                                                example_image):
    """Through a real tritonserver the python models host the fp16 engines behind float32 configs."""
    from conftest import served_and_local
    from ti2i.triton_models.server import TritonServer

    repository = write_repository(sd16_engines, tmp_path / "repository")
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        served, local = served_and_local(
            server, "grpc", sd16_engines.root,
            lambda runner: sdedit(runner, example_image, "a painting", steps=4, seed=2, progress=False).array)
    assert np.abs(served - local).max() <= 1e-6
