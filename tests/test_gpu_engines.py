"""The GPU engine path, everything of it that runs without a GPU: shape profiles from the declarations,
plan cache keys, native Triton configs and their consistency rules, the TensorRT error without TensorRT,
and AOTInductor packages built and run on the CPU against ONNX Runtime."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ti2i.client.images import psnr
from google.protobuf import text_format
from ti2i.client.runners import InProcessRunner
from ti2i.client.sdedit import sdedit
from ti2i.engines import builds, profiles
from ti2i.engines.adapters import LORA_RANK
from ti2i.engines.aoti import AotiEngine
from ti2i.engines.loader import load_engine
from ti2i.engines.ort import OrtEngine
from ti2i.export.build import build
from ti2i.export.components import COMPONENTS
from ti2i.triton_models.native import NativeOptions, native_config, write_native_repository
from ti2i.triton_models.repository import RepositoryOptions, parse_config
from tritonclient.grpc import model_config_pb2 as mc

from ti2i.errors import BackendUnavailableError, InvalidInputError, ModelNotFoundError
from ti2i.manifest import Manifest
from ti2i.spec import BATCH, sample_inputs

HAS_TENSORRT = subprocess.run([sys.executable, "-c", "import tensorrt"], capture_output=True).returncode == 0


# --- shape profiles ------------------------------------------------------------------------------------

def test_opt_sizes_are_declared_beside_each_component(sd_engines: Manifest, svd_engines: Manifest):
    """opt = the model's default resolution and the usual batch (the CFG pair for denoisers)."""
    pipeline = sd_engines.pipeline
    side = pipeline["unets"]["unet"]["default_size"]
    scale = pipeline["vae_scale_factor"]
    unet = sd_engines.components["unet"].spec
    assert unet.opt == {BATCH: 2, "height": side // scale, "width": side // scale}
    assert sd_engines.components["unet_pix2pix"].spec.opt[BATCH] == 3  # three guidance branches
    assert sd_engines.components["vae_decoder"].spec.opt == {BATCH: 1, "image_height": side, "image_width": side,
                                                             "height": side // scale, "width": side // scale}
    assert sd_engines.components["text_encoder"].spec.opt == {BATCH: 2}
    svd = svd_engines.pipeline["unets"]["unet_svd"]
    assert svd_engines.components["unet_svd"].spec.opt == {
        BATCH: 2, "frames": svd["num_frames"], "height": 576 // scale, "width": 1024 // scale}
    for manifest in (sd_engines, svd_engines):
        for entry in manifest.components.values():
            for dim, size in entry.spec.opt.items():
                low, high = entry.spec.dims[dim]
                assert low <= size <= high, (entry.spec.name, dim)


def test_profile_min_opt_max_come_from_the_declaration(sd_engines: Manifest):
    spec = sd_engines.components["unet"].spec
    prof = profiles.profile(spec)
    (b0, b2), (h0, h2), (w0, w2) = spec.dims[BATCH], spec.dims["height"], spec.dims["width"]
    channels = spec.input("sample").shape[1]
    seq, width = spec.input("encoder_hidden_states").shape[1:]
    assert prof["sample"] == ((b0, channels, h0, w0), (2, channels, spec.opt["height"], spec.opt["width"]),
                              (b2, channels, h2, w2))
    assert prof["timestep"] == ((b0,), (2,), (b2,))
    assert prof["encoder_hidden_states"][1] == (2, seq, width)
    assert profiles.max_batch(spec, prof) == spec.max_batch
    assert not profiles.is_static(prof)


def test_limits_cap_the_maximum_and_keep_opt_inside(sd_engines: Manifest):
    spec = sd_engines.components["unet"].spec
    prof = profiles.profile(spec, {BATCH: 4, "height": 3})
    low, opt, high = prof["sample"]
    assert high[0] == 4 and high[2] == 3 and opt[2] == 3  # opt clamped into the capped range
    assert profiles.max_batch(spec, prof) == 4
    with pytest.raises(InvalidInputError, match="below the declared minimum"):
        profiles.profile(spec, {BATCH: 0})
    assert profiles.parse_limits("batch=4, height=64") == {BATCH: 4, "height": 64}
    with pytest.raises(InvalidInputError, match="DIM=SIZE"):
        profiles.parse_limits("batch:4")


def test_a_spec_whose_range_is_one_size_has_a_static_profile(sd_engines: Manifest):
    spec = sd_engines.components["unet"].spec
    static = replace(spec, dims={BATCH: (2, 2), "height": (8, 8), "width": (8, 8), LORA_RANK: (1, 1)})
    prof = profiles.profile(static)
    assert profiles.is_static(prof)
    assert profiles.from_json(profiles.to_json(prof)) == prof


# --- plan cache keys -------------------------------------------------------------------------------------

def _facts(**changes):
    prof = {"sample": ((1, 4, 8, 8), (2, 4, 64, 64), (4, 4, 128, 128))}
    base = dict(onnx_sha256="a" * 64, tensorrt_version="10.5.0", gpu_name="NVIDIA H100 80GB HBM3",
                compute_capability="9.0", profile=prof)
    return builds.plan_facts(**{**base, **changes})


def test_plan_key_changes_with_every_fact_it_depends_on():
    key = builds.build_key(_facts())
    assert key == builds.build_key(_facts())  # deterministic
    changed = [
        _facts(onnx_sha256="b" * 64), _facts(tensorrt_version="10.6.0"), _facts(gpu_name="NVIDIA A100-SXM4-80GB"),
        _facts(compute_capability="8.0"),
        _facts(profile={"sample": ((1, 4, 8, 8), (2, 4, 72, 72), (4, 4, 128, 128))}),
    ]
    keys = {builds.build_key(f) for f in changed}
    assert key not in keys and len(keys) == len(changed)


def test_a_stale_build_is_never_returned_and_its_file_goes(tmp_path: Path):
    index = builds.BuildIndex.load(tmp_path, "tensorrt")
    old_key, new_key = builds.build_key(_facts()), builds.build_key(_facts(tensorrt_version="10.6.0"))
    old_file = builds.file_name("unet", old_key, ".plan")
    index.root.mkdir(parents=True)
    (index.root / old_file).write_bytes(b"plan")
    index.record("unet", old_key, old_file, _facts())
    reloaded = builds.BuildIndex.load(tmp_path, "tensorrt")
    assert reloaded.fresh("unet", old_key) == index.root / old_file
    assert reloaded.fresh("unet", new_key) is None  # another TensorRT: rebuild
    assert reloaded.profile("unet")["sample"][1] == (2, 4, 64, 64)
    new_file = builds.file_name("unet", new_key, ".plan")
    (index.root / new_file).write_bytes(b"new plan")
    reloaded.record("unet", new_key, new_file, _facts(tensorrt_version="10.6.0"))
    assert not (index.root / old_file).exists()
    (index.root / new_file).unlink()
    assert reloaded.fresh("unet", new_key) is None  # recorded but missing: rebuilt too


def test_onnx_fingerprint_follows_the_graph_and_its_weights(tmp_path: Path):
    graph = tmp_path / "unet.onnx"
    graph.write_bytes(b"graph")
    first = builds.file_fingerprint(graph)
    graph.with_name("unet.onnx.data").write_bytes(b"weights")
    assert builds.file_fingerprint(graph) != first


# --- TensorRT without TensorRT ------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_build_tensorrt_without_tensorrt_is_one_line(sd16_engines: Manifest):
    done = subprocess.run([sys.executable, "-m", "ti2i.client.cli", "build", "--backend", "tensorrt", "--engines",
                           str(sd16_engines.root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("ti2i")]
    assert lines == [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "TensorRT is not installed" in lines[0] and "ti2i[tensorrt]" in lines[0]
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed"):
        build(sd16_engines.root, "tensorrt")
    assert not (sd16_engines.root / "tensorrt").exists()


# --- native Triton configs ------------------------------------------------------------------------------------

def _roundtrip(config: mc.ModelConfig, tmp_path: Path) -> mc.ModelConfig:
    path = tmp_path / "config.pbtxt"
    path.write_text(text_format.MessageToString(config))
    return parse_config(path)


@pytest.mark.parametrize("limits", [{}, {BATCH: 4}])
def test_tensorrt_plan_config_keeps_max_batch_within_the_profile(sd16_engines: Manifest, tmp_path: Path, limits):
    spec = sd16_engines.components["unet"].spec
    prof = profiles.profile(spec, limits)
    config = _roundtrip(native_config(spec, "tensorrt", sd16_engines, RepositoryOptions(), NativeOptions(), prof),
                        tmp_path)
    assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
    assert 0 < config.max_batch_size <= profiles.max_batch(spec, prof)
    assert config.max_batch_size == min(spec.max_batch, limits.get(BATCH, spec.max_batch))
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert config.HasField("dynamic_batching")
    assert not config.optimization.cuda.graphs  # dynamic shapes: no CUDA graphs
    types = {t.name: mc.DataType.Name(t.data_type) for t in (*config.input, *config.output)}
    assert types == {"sample": "TYPE_FP16", "timestep": "TYPE_FP32", "encoder_hidden_states": "TYPE_FP16",
                     "lora_down": "TYPE_FP16", "lora_up": "TYPE_FP16", "noise_pred": "TYPE_FP16"}


def test_cuda_graphs_only_for_static_profiles(sd16_engines: Manifest, tmp_path: Path):
    spec = replace(sd16_engines.components["unet"].spec,
                   dims={BATCH: (2, 2), "height": (8, 8), "width": (6, 6), LORA_RANK: (1, 1)})
    prof = profiles.profile(spec)
    config = _roundtrip(native_config(spec, "tensorrt", sd16_engines, RepositoryOptions(), NativeOptions(), prof),
                        tmp_path)
    assert config.optimization.cuda.graphs and config.max_batch_size == 2
    (graph,) = config.optimization.cuda.graph_spec
    assert graph.batch_size == 2
    assert list(graph.input["sample"].dim) == [4, 8, 6] and list(graph.input["timestep"].dim) == [1]
    off = native_config(spec, "tensorrt", sd16_engines, RepositoryOptions(), NativeOptions(cuda_graphs=False), prof)
    assert not off.optimization.cuda.graphs


def _node(config: mc.ModelConfig, tensor, own: bool) -> tuple[int, list[int], list[int], str]:
    """An ensemble tensor as Triton's validator sees it: type, dims (an ensemble's own tensors: their reshape) and
    full dims (the batch dim expanded), and where it was inferred from."""
    dims = list(tensor.reshape.shape) if own and tensor.HasField("reshape") else list(tensor.dims)
    return tensor.data_type, dims, ([-1] if config.max_batch_size > 0 else []) + dims, config.name


def _same_dims(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def check_ensembles(configs: dict[str, mc.ModelConfig]) -> None:
    """Triton's ensemble rules (core `ValidateEnsembleConfig`): every step's model exists and maps only its own
    tensors, every input is mapped, no batching composing model batches less than the ensemble, and each
    ensemble tensor has one data type and agreeing shapes (as given, or with the batch dim expanded) wherever
    it is used."""
    for name, config in configs.items():
        if config.platform != "ensemble":
            continue
        seen = {t.name: _node(config, t, own=True) for t in (*config.input, *config.output)}
        for step in config.ensemble_scheduling.step:
            composing = configs[step.model_name]
            assert composing.max_batch_size == 0 or composing.max_batch_size >= config.max_batch_size, (name, step)
            tensors = {t.name: t for t in (*composing.input, *composing.output)}
            assert set(step.input_map) == {t.name for t in composing.input}, (name, step.model_name)
            assert set(step.output_map) <= {t.name for t in composing.output}, (name, step.model_name)
            for inner, outer in (*step.input_map.items(), *step.output_map.items()):
                here = _node(composing, tensors[inner], own=False)
                there = seen.setdefault(outer, here)
                assert here[0] == there[0], f"{name}.{outer}: type of {here[3]} vs {there[3]}"
                assert _same_dims(here[1], there[1]) or _same_dims(here[2], there[2]), \
                    f"{name}.{outer}: dims {here[2]} of {here[3]} vs {there[2]} of {there[3]}"


def test_onnxruntime_repository_wires_native_networks_to_python_steps(sd16_engines: Manifest, tmp_path: Path):
    repo = write_native_repository(sd16_engines, tmp_path / "repository", "onnxruntime",
                                   native=NativeOptions(tensorrt_accelerator=True))
    configs = {p.name: parse_config(p / "config.pbtxt") for p in repo.iterdir()}
    for name in ("text_encoder", "vae_encoder", "vae_decoder", "unet"):
        config = configs[name]
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == sd16_engines.components[
            name].spec.max_batch
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        model = repo / name / "1" / "model.onnx"
        assert model.resolve() == sd16_engines.path_of(name).resolve() and not (repo / name / "1" / "model.py").exists()
    for name in ("tokenize", "image_preprocess", "image_postprocess"):
        assert configs[name].backend == "python" and (repo / name / "1" / "model.py").is_file()
    check_ensembles(configs)
    assert mc.DataType.Name(configs["image_postprocess"].input[0].data_type) == "TYPE_FP16"


def test_tensorrt_repository_needs_built_plans(sd16_engines: Manifest, tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="ti2i build --backend tensorrt"):
        write_native_repository(sd16_engines, tmp_path / "repository", "tensorrt")


# --- AOTInductor on the CPU -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aoti_engines(sd_engines: Manifest, tmp_path_factory) -> Manifest:
    """A copy of the SD engines with the text encoder compiled by AOTInductor for the CPU (the one
    component small enough to compile within a test's time on two shared cores)."""
    root = tmp_path_factory.mktemp("aoti") / "engines"
    shutil.copytree(sd_engines.root, root)
    build(root, "aoti", components="text_encoder", device="cpu", log=lambda _: None)
    return Manifest.load(root)


def test_aoti_engine_matches_onnx_runtime_within_tolerance(aoti_engines: Manifest):
    engine = load_engine(aoti_engines, "text_encoder", backend="aoti")
    reference = OrtEngine(aoti_engines.path_of("text_encoder"), aoti_engines.components["text_encoder"].spec)
    assert isinstance(engine, AotiEngine) and engine.dynamic
    tolerance = COMPONENTS["text_encoder"].tolerance
    for batch in (1, 2, 3):  # the declared batch dim stays dynamic
        inputs = sample_inputs(engine.spec, {BATCH: batch}, seed=batch)
        got, expected = engine.run(inputs)["text_embeddings"], reference.run(inputs)["text_embeddings"]
        assert got.shape == expected.shape == (batch, 77, engine.spec.output("text_embeddings").shape[2])
        assert float(np.abs(got - expected).max() / np.abs(expected).max()) <= tolerance


def test_aoti_build_is_cached_and_runs_a_method(aoti_engines: Manifest, example_image):
    lines = []
    build(aoti_engines.root, "aoti", components="text_encoder", device="cpu", log=lines.append)
    assert lines == ["text_encoder: AOTInductor package up to date"]
    def run(**options):
        with InProcessRunner(aoti_engines.root, **options) as runner:
            return sdedit(runner, example_image, "a painting", steps=4, seed=1, progress=False).array
    db = psnr(run(backend="aoti"), run())
    print(f"\nSDEdit with the AOTInductor text encoder vs all-ONNX Runtime: PSNR {db:.1f} dB")
    assert db >= 60.0


def test_the_engine_core_serves_every_method_on_aoti_engines(aoti_engines: Manifest, example_image, tmp_path):
    """`ti2i serve --backend aoti`: the core runs the AOTInductor packages (the rest on ONNX Runtime); each SD
    method served (gRPC stream and HTTP plain in turn) equals the in-process loop over the same engines."""
    from conftest import server_url
    from test_method_models import _inputs
    from ti2i.client.registry import METHODS
    from ti2i.client.remote import run_remote
    from ti2i.triton_models.core import CoreOptions
    from ti2i.triton_models.method_repository import servable_methods
    from ti2i.triton_models.repository import write_repository
    from ti2i.triton_models.server import TritonServer

    methods = servable_methods(aoti_engines.components)
    assert {"txt2img", "sdedit", "inpaint", "pix2pix", "cyclediffusion", "ddib", "videoldm"} <= set(methods)
    repository = write_repository(aoti_engines, tmp_path / "repository", methods=methods,
                                  core_options=CoreOptions(backend="aoti"))
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        served = {m: run_remote(server_url(server, protocol), METHODS[m], progress=False,
                                stream=protocol == "grpc", **_inputs(m, example_image))
                  for m, protocol in zip(methods, ["grpc", "http"] * len(methods))}
        assert "aoti engines on cpu" in server.log_path.read_text()
    with InProcessRunner(aoti_engines.root, backend="aoti") as runner:
        for method, result in served.items():
            local = METHODS[method](runner, **_inputs(method, example_image))
            pixels = [np.asarray(r.frames if hasattr(r, "frames") else r.image) for r in (result, local)]
            np.testing.assert_array_equal(*pixels, err_msg=method)


def test_the_engine_core_serves_svd_on_aoti_engines(svd_engines: Manifest, example_image, tmp_path):
    """SVD's family on `ti2i serve --backend aoti` (its image encoder an AOTInductor package, the rest on ONNX
    Runtime): served, streamed over gRPC and plain over HTTP, it equals the in-process loop over the same engines."""
    from conftest import server_url
    from test_method_models import _inputs
    from ti2i.client.registry import METHODS
    from ti2i.client.remote import run_remote
    from ti2i.triton_models.core import CoreOptions
    from ti2i.triton_models.repository import write_repository
    from ti2i.triton_models.server import TritonServer

    root = tmp_path / "engines"
    shutil.copytree(svd_engines.root, root)
    build(root, "aoti", components="image_encoder", device="cpu", log=lambda _: None)
    engines = Manifest.load(root)
    repository = write_repository(engines, tmp_path / "repository", methods=["svd"],
                                  core_options=CoreOptions(backend="aoti"))
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        served = [run_remote(server_url(server, protocol), METHODS["svd"], progress=False, stream=protocol == "grpc",
                             **_inputs("svd", example_image)) for protocol in ("grpc", "http")]
        assert "aoti engines on cpu" in server.log_path.read_text()
    with InProcessRunner(root, backend="aoti") as runner:
        local = np.asarray(METHODS["svd"](runner, **_inputs("svd", example_image)).frames)
    for result in served:
        np.testing.assert_array_equal(np.asarray(result.frames), local)


def test_run_tensors_takes_and_returns_torch_tensors(aoti_engines: Manifest):
    """The device-loop building block, on the CPU: the same values as the numpy path, as torch tensors."""
    inputs = sample_inputs(aoti_engines.components["text_encoder"].spec, {BATCH: 2})
    with InProcessRunner(aoti_engines.root, backend="aoti") as runner:
        expected = runner.run("text_encoder", input_ids=inputs["input_ids"])["text_embeddings"]  # no adapter
        got = runner.run_tensors("text_encoder", input_ids=torch.from_numpy(inputs["input_ids"]))["text_embeddings"]
        unet_inputs = sample_inputs(aoti_engines.components["unet"].spec, {BATCH: 2, "height": 8, "width": 6})
        via_ort = runner.run_tensors("unet", **{k: torch.from_numpy(v) for k, v in unet_inputs.items()})
        with pytest.raises(InvalidInputError, match="text_encoder.input_ids"):
            runner.run_tensors("text_encoder", input_ids=torch.zeros((2, 5), dtype=torch.int32))
    assert isinstance(got, torch.Tensor) and np.array_equal(got.numpy(), expected)
    np.testing.assert_array_equal(via_ort["noise_pred"].numpy(), runner_numpy_unet(aoti_engines, unet_inputs))


def test_aoti_repository_serves_packages_by_position(aoti_engines: Manifest, tmp_path: Path):
    """torch_aoti models: batch 1 in Triton's sense (max_batch_size 0, full dims), tensors named by their
    position in the package's call spec, the component's name an ensemble alias with the declared names;
    components without a package stay python models."""
    from torch.utils._pytree import treespec_loads

    repo = write_native_repository(aoti_engines, tmp_path / "repository", "aoti")
    configs = {p.name: parse_config(p / "config.pbtxt") for p in repo.iterdir()}
    spec = aoti_engines.components["text_encoder"].spec
    native = configs["text_encoder_aoti"]
    assert (native.backend, native.platform, native.default_model_filename) == ("pytorch", "torch_aoti", "model.pt2")
    assert native.max_batch_size == 0 and native.dynamic_batching.max_queue_delay_microseconds == 0
    assert native.dynamic_batching.default_queue_policy.max_queue_size == RepositoryOptions().max_queue_size
    assert [g.kind for g in native.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]  # built for the CPU
    features = spec.input("lora_down").shape[1]  # the adapter inputs follow the ids (engines/adapters.py)
    assert [(t.name, list(t.dims)) for t in native.input] == [("INPUT__0", [-1, 77]), ("INPUT__1", [-1, features, -1]),
                                                              ("INPUT__2", [-1, -1, features])]
    assert [t.name for t in native.output] == ["OUTPUT__0"]
    package = repo / "text_encoder_aoti" / "1" / "model.pt2"
    index = builds.BuildIndex.load(aoti_engines.root, "aoti")
    assert package.resolve() == index.path("text_encoder").resolve()
    # the positions are the package's: as many leaves in its call spec as the declaration has tensors
    in_spec, out_spec = torch._inductor.aoti_load_package(str(package)).loader.get_call_spec()
    assert treespec_loads(in_spec).num_leaves == len(spec.inputs) == len(native.input)
    assert treespec_loads(out_spec).num_leaves == len(spec.outputs) == len(native.output)
    alias = configs["text_encoder"]
    assert alias.platform == "ensemble" and alias.max_batch_size == spec.max_batch
    (step,) = alias.ensemble_scheduling.step
    assert step.model_name == "text_encoder_aoti" and dict(step.input_map) == {
        "INPUT__0": "input_ids", "INPUT__1": "lora_down", "INPUT__2": "lora_up"}
    assert not any((repo / "text_encoder" / "1").iterdir())
    (step, encode) = configs["encode_prompt"].ensemble_scheduling.step
    assert (step.model_name, encode.model_name) == ("tokenize", "text_encoder_aoti")
    assert dict(encode.output_map) == {"OUTPUT__0": "text_embeddings"}
    assert configs["unet"].backend == "python"  # not packaged: ONNX Runtime in a python model
    check_ensembles(configs)


# Triton's pytorch backend (torch_aoti) is not in the CPU build here: a python model with the torch_aoti model's
# config and the pytorch backend's convention (the package called with the inputs in position order) stands in
# for it, so that a real tritonserver checks the alias and the positional wiring.
AOTI_STAND_IN = '''
import json

import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.package = torch._inductor.aoti_load_package(f"{args['model_repository']}/{args['model_version']}/model.pt2")

    def execute(self, requests):
        responses = []
        for request in requests:
            args = [torch.from_numpy(pb_utils.get_input_tensor_by_name(request, n).as_numpy()) for n in self.inputs]
            with torch.inference_mode():
                out = self.package(*args)
            out = out if isinstance(out, (list, tuple)) else (out,)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, v.numpy()) for n, v in zip(self.outputs, out)]))
        return responses
'''


def test_a_served_aoti_repository_answers_under_the_declared_names(aoti_unet_engines: Manifest, tmp_path: Path):
    """The text encoder and the UNet (three inputs: a wrong position fails) served through their aliases, one
    of them inside `encode_prompt`, batch 2: the in-process AOTInductor engines' values."""
    from ti2i.client.runners import TritonRunner
    from ti2i.triton_models.server import TritonServer

    repo = write_native_repository(aoti_unet_engines, tmp_path / "repository", "aoti",
                                   models=["tokenize", "text_encoder", "unet"])
    for name in ("text_encoder_aoti", "unet_aoti"):
        config = parse_config(repo / name / "config.pbtxt")
        config.ClearField("platform")
        config.ClearField("default_model_filename")
        config.backend = "python"
        (repo / name / "config.pbtxt").write_text(text_format.MessageToString(config))
        (repo / name / "1" / "model.py").write_text(AOTI_STAND_IN)
    specs = aoti_unet_engines.components
    ids = sample_inputs(specs["text_encoder"].spec, {BATCH: 2}, seed=3)["input_ids"]
    unet_inputs = sample_inputs(specs["unet"].spec, {BATCH: 2, "height": 8, "width": 8}, seed=4)
    prompts = np.array(["a red cube", "two dogs on a beach"], dtype=object)

    def calls(runner):
        return (runner.run("text_encoder", input_ids=ids)["text_embeddings"],
                runner.run("encode_prompt", text=prompts)["text_embeddings"],
                runner.run("unet", **unet_inputs)["noise_pred"])

    with InProcessRunner(aoti_unet_engines.root, backend="aoti") as local:
        expected = calls(local)
    with TritonServer(repo, log_path=tmp_path / "server.log") as server, \
            TritonRunner(f"grpc://{server.grpc_url}") as runner:
        served = calls(runner)
    for got, want in zip(served, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def runner_numpy_unet(manifest: Manifest, inputs) -> np.ndarray:
    with InProcessRunner(manifest.root) as runner:
        return runner.run("unet", **inputs)["noise_pred"]


# --- loops on the device --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aoti_unet_engines(aoti_engines: Manifest, tmp_path_factory) -> Manifest:
    """The AOTInductor engines above with the UNet compiled too (about two minutes on two shared cores)."""
    root = tmp_path_factory.mktemp("aoti-unet") / "engines"
    shutil.copytree(aoti_engines.root, root)
    build(root, "aoti", components="unet", device="cpu", log=lambda _: None)
    return Manifest.load(root)


class _Counting:
    """Counts an engine's numpy calls (`run`) and device calls (`run_device`) while `active`."""

    def __init__(self, engine):
        self.numpy = self.device = 0
        self.active = False
        run, run_device = engine.run, engine.run_device

        def counted_run(inputs):
            self.numpy += self.active
            return run(inputs)

        def counted_run_device(inputs):
            self.device += self.active
            assert all(isinstance(v, torch.Tensor) for v in inputs.values())
            return run_device(inputs)

        engine.run, engine.run_device = counted_run, counted_run_device


def test_a_method_loop_on_device_engines_never_goes_through_numpy(aoti_unet_engines: Manifest, monkeypatch):
    """SDEdit with the UNet (and text encoder) on AOTInductor engines: every step calls the UNet's device
    path on torch tensors, never its numpy `run`, and no tensor becomes a numpy array while the loop runs
    (its latents stay where the engines are: on a GPU, no host round trip per step). The result equals the
    all-ONNX Runtime one within the AOTInductor tolerance above."""
    from PIL import Image

    # 64² pixels: an AOTInductor UNet takes latent sizes in multiples of 8
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    steps, strength = 6, 0.5
    in_loop, loop_steps = [False], [0]
    numpy_calls = []
    to_numpy = torch.Tensor.numpy

    def watched_numpy(self, *args, **kwargs):
        if in_loop[0]:
            numpy_calls.append(tuple(self.shape))
        return to_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", watched_numpy)
    with InProcessRunner(aoti_unet_engines.root, backend="aoti", device="cpu") as runner:
        assert isinstance(runner.engine("unet"), AotiEngine) and runner.device == torch.device("cpu")
        unet = _Counting(runner.engine("unet"))

        def progress(loop: str, done: int, total: int) -> None:
            in_loop[0] = unet.active = done < total
            loop_steps[0] = total

        result = sdedit(runner, image, "a painting", steps=steps, strength=strength, seed=2, progress=progress)
    with InProcessRunner(aoti_unet_engines.root) as runner:  # ONNX Runtime everywhere
        reference = sdedit(runner, image, "a painting", steps=steps, strength=strength, seed=2, progress=False)
    assert loop_steps[0] >= int(steps * strength)  # PNDM repeats its first timestep
    assert (unet.device, unet.numpy) == (loop_steps[0], 0)
    assert numpy_calls == [], f"tensors turned into numpy inside the loop: {numpy_calls}"
    db = psnr(result.array, reference.array)
    rel = float((result.latents - reference.latents).abs().max() / reference.latents.abs().max())
    print(f"\nSDEdit on AOTInductor engines (device loop) vs ONNX Runtime: PSNR {db:.1f} dB, latents rel {rel:.1e}")
    assert db >= 60.0


def test_a_numpy_runner_gives_bit_identical_results(sd_engines: Manifest, example_image):
    """A runner that speaks only numpy (as the Triton runners and the server-side BLS runner do) gets the
    loop's tensors through `Runner.run_tensors`'s default: the very arrays, so the very result, of the
    in-process runner; and every call it sees is numpy."""
    from ti2i.runner import Runner

    seen = []

    class NumpyRunner(Runner):
        def __init__(self, inner):
            self.inner, self.pipeline = inner, inner.pipeline

        def run(self, model, /, outputs=None, **inputs):
            seen.extend(type(v) for v in inputs.values())
            return self.inner.run(model, outputs, **inputs)

    with InProcessRunner(sd_engines.root) as inner:
        local = sdedit(inner, example_image, "a painting", steps=4, seed=1, progress=False)
        numpy_only = sdedit(NumpyRunner(inner), example_image, "a painting", steps=4, seed=1, progress=False)
    assert seen and set(seen) == {np.ndarray}
    np.testing.assert_array_equal(numpy_only.array, local.array)
    assert torch.equal(numpy_only.latents, local.latents)


def test_cli_repository_backends(sd16_engines: Manifest, tmp_path: Path, capsys):
    from ti2i.client.cli import main

    assert main(["repository", "--engines", str(sd16_engines.root), "--backend", "onnxruntime",
                 "--out", str(tmp_path / "ort")]) == 0
    assert parse_config(tmp_path / "ort" / "unet" / "config.pbtxt").platform == "onnxruntime_onnx"
    capsys.readouterr()
    assert main(["repository", "--engines", str(sd16_engines.root), "--backend", "tensorrt",
                 "--out", str(tmp_path / "trt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no TensorRT plans" in err[0]


def test_plans_default_to_ranges_a_gpu_can_hold(sd_engines: Manifest, svd_engines: Manifest):
    from ti2i.export.tensorrt import _limits_for

    unet = sd_engines.components["unet"].spec
    prof = profiles.profile(unet, _limits_for(unet, None))
    assert prof["sample"][2][0] == 8 and prof["sample"][2][2:] == (128, 128)
    assert prof["sample"][1] == (2, 4, unet.opt["height"], unet.opt["width"])  # opt untouched
    prof = profiles.profile(unet, _limits_for(unet, {BATCH: 2}))
    assert prof["sample"][2][0] == 2
    svd = svd_engines.components["unet_svd"].spec
    assert profiles.profile(svd, _limits_for(svd, None))["sample"][2][1] == 25  # SVD-XT's frames
