"""Several model families (SD and SVD engine directories) behind one Triton server."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import max_abs
from google.protobuf import json_format
from ti2i.benchmarks.settle import settled
from ti2i.client.cli import main
from ti2i.client.methods import components_for
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner, TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.client.svd import svd
from ti2i.client.txt2img import txt2img
from ti2i.errors import InvalidInputError, ModelNotFoundError
from ti2i.families import FAMILY_PARAMETER, parse_engine_dirs, split_served_name
from ti2i.triton_models.directory import DIRECTORY_MODEL, listing
from ti2i.triton_models.families import write_family_repository
from ti2i.triton_models.repository import RepositoryOptions, parse_config, write_repository
from ti2i.triton_models.server import TritonServer

SD_METHODS = ["sdedit", "txt2img"]  # enough of the SD family to show both families side by side


@pytest.fixture(scope="module")
def family_server(engines, svd_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    repository = write_family_repository({"sd": engines, "svd": svd_engines}, root / "repository",
                                         models={"sd": components_for(SD_METHODS), "svd": None},
                                         methods={"sd": ["sdedit"]})
    # the operator's way: one key in the environment, read by the server and by every runner
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TI2I_API_KEY", "families-test-key")
        with TritonServer(repository, log_path=root / "server.log") as server:
            yield server


def test_named_families_prefix_every_model_and_ensemble_step(engines, svd_engines, tmp_path):
    out = write_family_repository({"sd": engines, "svd": svd_engines}, tmp_path / "repo")
    names = sorted(p.name for p in out.iterdir() if p.name != DIRECTORY_MODEL)
    assert {split_served_name(n)[0] for n in names} == {"sd", "svd"}
    served = listing(json_format.MessageToDict(parse_config(out / DIRECTORY_MODEL / "config.pbtxt"),
                                               preserving_proto_field_name=True))
    assert sorted(served["sd"] + served["svd"]) == names
    assert "sd.vae_encoder" in names and "svd.vae_encoder" in names  # the names that collide unprefixed
    for name in names:
        config = parse_config(out / name / "config.pbtxt")
        assert config.name == name
        assert config.parameters[FAMILY_PARAMETER].string_value == split_served_name(name)[0]
        for step in config.ensemble_scheduling.step:
            assert step.model_name in names and split_served_name(step.model_name)[0] == split_served_name(name)[0]
    assert parse_config(out / "sd.encode_image" / "config.pbtxt").ensemble_scheduling.step[1].model_name == \
        "sd.vae_encoder"


def test_one_unnamed_family_keeps_todays_repository_exactly(engines, tmp_path):
    options = RepositoryOptions(memory_budget=8 * 2**30)  # else each reads the memory available at that moment
    before = write_repository(engines, tmp_path / "plain", options)
    after = write_family_repository(parse_dirs_to_manifests([str(engines.root)]), tmp_path / "family", options)
    assert sorted(p.name for p in before.iterdir()) == sorted(p.name for p in after.iterdir())
    for model in before.iterdir():
        assert filecmp.cmp(model / "config.pbtxt", after / model.name / "config.pbtxt", shallow=False)


def parse_dirs_to_manifests(values):
    from ti2i.manifest import Manifest

    return {name: Manifest.load(path) for name, path in parse_engine_dirs(values).items()}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_server_answers_sd_and_svd_with_parity(protocol, family_server, engines, svd_engines, example_image):
    url = f"grpc://{family_server.grpc_url}" if protocol == "grpc" else f"http://{family_server.http_url}"
    dirs = {"sd": engines.root, "svd": svd_engines.root}
    cases = {
        "sdedit": lambda r: sdedit(r, example_image, "a painting", steps=3, seed=2, progress=False),
        "txt2img": lambda r: txt2img(r, "a painting", steps=2, seed=3, height=32, width=32, progress=False),
        "svd": lambda r: svd(r, example_image, frames=3, steps=2, seed=4, height=32, width=32, progress=False),
    }
    with TritonRunner(url) as served_runner, InProcessRunner(dirs) as local_runner, \
            InProcessRunner(engines.root) as sd_alone:
        assert sorted(served_runner.families, key=str) == ["sd", "svd"]
        for method, run in cases.items():  # interleaved: each call finds its own family
            served, local = run(served_runner), run(local_runner)
            assert max_abs(served.array, local.array) <= 1e-5, method
        alone = cases["sdedit"](sd_alone)  # the SD family served with SVD beside it == served on its own
        assert max_abs(cases["sdedit"](served_runner).array, alone.array) <= 1e-5


def test_family_choice_and_errors_name_the_families(family_server, engines, example_image):
    url = f"grpc://{family_server.grpc_url}"
    with TritonRunner(url) as runner:
        with pytest.raises(ModelNotFoundError, match=r"several model families are served \(sd, svd\)"):
            runner.pipeline
        assert runner.for_family("svd").run("image_postprocess", images=_images())["image"].shape == (1, 8, 8, 3)
        with pytest.raises(ModelNotFoundError, match=r"family 'svd' lacks .*sdedit.*families: sd, svd"):
            TritonRunner(url, family="svd").for_method("sdedit")
    with pytest.raises(ModelNotFoundError, match=r"no model family 'sd15' is served \(families: sd, svd\)"):
        TritonRunner(url, family="sd15")
    with pytest.raises(ModelNotFoundError, match=r"no served model family has every model pix2pix needs"):
        TritonRunner(url).for_method("pix2pix")  # the SD family is served without unet_pix2pix here
    # two families that can both serve a method: the caller chooses
    twins = {"a": engines.root, "b": engines.root}
    with pytest.raises(InvalidInputError, match=r"several model families can serve sdedit \(a, b\).*--family"):
        sdedit(InProcessRunner(twins), example_image, "x", steps=1, progress=False)
    with InProcessRunner(twins, family="b") as runner:
        assert sdedit(runner, example_image, "x", steps=2, progress=False).array.shape == (48, 64, 3)


def test_a_client_without_the_key_or_a_family_finds_the_methods_family(family_server, example_image, monkeypatch):
    """The repository index is the key's; a keyless client read it in vain and exited 2 ("no ti2i pipeline
    facts"), and `--remote` asked for an unprefixed 'sdedit_stream'. The open `families` model lists them."""
    keyed = sdedit(TritonRunner(f"grpc://{family_server.grpc_url}"), example_image, "x", steps=2, progress=False)
    monkeypatch.delenv("TI2I_API_KEY")
    for url in (f"grpc://{family_server.grpc_url}", f"http://{family_server.http_url}"):
        with TritonRunner(url) as runner:
            assert set(runner.families) == {"sd", "svd"}
            assert max_abs(sdedit(runner, example_image, "x", steps=2, progress=False).array, keyed.array) == 0
        remote = run_remote(url, METHODS["sdedit"], progress=False, image=example_image, prompt="x", steps=2)
        assert max_abs(remote.array, keyed.array) <= 1 / 255
        with pytest.raises(ModelNotFoundError, match=r"no family serves 'pix2pix' \(families: sd, svd\)"):
            run_remote(url, METHODS["pix2pix"], progress=False, image=example_image, prompt="x", steps=2)


def _images():
    return np.zeros((1, 3, 8, 8), np.float32)


def test_cli_serves_methods_per_family_and_rejects_unnamed_pairs(engines, svd_engines, tmp_path, capsys):
    out = tmp_path / "repo"
    assert main(["repository", "--engines", f"sd={engines.root}", "--engines", f"svd={svd_engines.root}",
                 "--methods", "sdedit,svd", "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {n for n in names if n.startswith("sd.")} == {"sd." + m for m in components_for(["sdedit"])} | {
        "sd.encode_prompt", "sd.encode_image", "sd.decode_image", "sd.sdedit", "sd.sdedit_stream", "sd.core"}
    assert {n for n in names if n.startswith("svd.")} >= {"svd.unet_svd", "svd.image_encoder", "svd.svd",
                                                          "svd.svd_stream", "svd.core"}
    assert "sd.unet_pix2pix" not in names and "svd.unet" not in names
    capsys.readouterr()
    assert main(["repository", "--engines", str(engines.root), "--engines", str(svd_engines.root),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "NAME=DIR" in err
    assert main(["repository", "--engines", f"sd={engines.root}", "--methods", "svd", "--out", str(tmp_path / "y")]) == 2
    assert "no engine directory (sd) serves svd (it needs" in capsys.readouterr().err


def test_capacity_counts_the_autoscalers_signal_from_the_servers_metrics(family_server):
    """benchmarks/capacity.py reads the queue-time signal as the adapter rule does: Δ queue µs / Δ successes."""
    from ti2i.benchmarks.capacity import measure

    def successes() -> int:  # Triton's statistics API: a second account of the same calls
        client = grpcclient.InferenceServerClient(family_server.grpc_url)
        stats = client.get_inference_statistics(headers=family_server.api_headers, as_json=True)["model_stats"]
        client.close()
        return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats)

    run = lambda r: txt2img(r, "hills", steps=2, seed=0, height=32, width=32, progress=False)  # noqa: E731
    before = settled(successes)
    level = measure(f"grpc://{family_server.grpc_url}", family_server.metrics_url, run, clients=2, count=3)
    calls = settled(successes) - before
    assert calls % 5 == 0  # 2 warm-up requests + 3 measured, each the same calls
    assert level["model_calls"] == calls // 5 * 3
    assert level["requests"] == 3 and level["requests_per_s"] > 0 and level["queue_us_per_call"] >= 0
