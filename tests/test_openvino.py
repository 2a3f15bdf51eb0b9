"""The OpenVINO backend: the exported ONNX graphs compiled for this CPU, fp32 and bf16.

fp32 matches ONNX Runtime within each component's export tolerance; bf16 (where this CPU has the units, as
OpenVINO's CPU plugin reports them) keeps every method's image within 35 dB PSNR of the exact fp32 path;
the compiled blobs are cached per precision beside the engines; and the engine core serves every method
on it with the in-process result, over gRPC and HTTP.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import server_url
from ti2i.client.images import psnr
from test_method_models import _inputs, _pixels
from ti2i.client.registry import METHODS
from ti2i.client.remote import run_remote
from ti2i.client.runners import InProcessRunner
from ti2i.engines.loader import describe_choice, engine_choice, load_engine
from ti2i.engines.openvino import CACHE_FOLDER, OpenVinoEngine, matrix_units, resolve_precision
from ti2i.errors import InvalidInputError
from ti2i.export.components import COMPONENTS
from ti2i.manifest import ONNX, Manifest
from ti2i.spec import sample_inputs
from ti2i.triton_models.core import CoreOptions
from ti2i.triton_models.families import write_family_repository
from ti2i.triton_models.server import TritonServer

pytestmark = pytest.mark.timeout(600)

# bf16 where this CPU's matrix units run it (Intel AMX or AVX-512-BF16), fp32 elsewhere (e.g. AMD Zen 3).
BF16_CPU = bool({"amx_bf16", "avx512_bf16"} & set(matrix_units()))
PRECISION = "bf16" if BF16_CPU else "fp32"
BF16_PSNR_DB = 35.0


def _onnx_components(manifest: Manifest) -> list[str]:
    return [name for name, entry in manifest.components.items() if entry.backend == ONNX]


def test_auto_precision_follows_the_cpus_bf16_units():
    assert resolve_precision("auto") == PRECISION
    assert describe_choice(engine_choice("openvino")).startswith(f"openvino {PRECISION} on ")
    if not BF16_CPU:
        with pytest.raises(InvalidInputError, match="no bf16 units"):
            resolve_precision("bf16")


def test_bf16_is_openvinos_alone():
    with pytest.raises(InvalidInputError, match="only the openvino backend runs bf16"):
        engine_choice("ort", "bf16")
    with pytest.raises(InvalidInputError, match="bf16 with the openvino backend"):
        CoreOptions(backend="ort", precision="bf16")
    assert engine_choice("ort") == {"backend": "onnxruntime", "precision": "fp32"}


@pytest.mark.parametrize("family", ["engines", "svd_engines"])
def test_fp32_engines_match_onnx_runtime_within_the_export_tolerance(family, request):
    manifest: Manifest = request.getfixturevalue(family)
    for name in _onnx_components(manifest):
        inputs = sample_inputs(manifest.components[name].spec, COMPONENTS[name].sample_sizes[0])
        reference = load_engine(manifest, name).run(inputs)
        got = load_engine(manifest, name, backend="openvino", precision="fp32").run(inputs)
        for output, value in reference.items():
            error = np.abs(got[output] - value).max() / max(np.abs(value).max(), 1e-6)
            assert error <= COMPONENTS[name].tolerance, f"{name}.{output}: relative error {error:.1e}"


def test_compiled_blobs_are_cached_per_precision(sd_engines: Manifest):
    """OpenVINO keys a blob compiled from a path without its precision: one cache folder per precision, or a
    bf16 compile would load the fp32 blob and give NaN."""
    spec = sd_engines.components["unet"].spec
    inputs = sample_inputs(spec, spec.opt)
    for precision in ("fp32", PRECISION, "fp32"):
        load_engine(sd_engines, "unet", backend="openvino", precision=precision).run(inputs)  # finite, or raises
        blobs = list((sd_engines.root / CACHE_FOLDER / precision).glob("*.blob"))
        assert blobs, f"no {precision} blob cached"


def test_a_component_declared_fp32_runs_fp32_in_a_bf16_run(svd_engines: Manifest):
    assert not COMPONENTS["vae_decoder_temporal"].bf16
    engine = load_engine(svd_engines, "vae_decoder_temporal", backend="openvino", precision=PRECISION)
    assert isinstance(engine, OpenVinoEngine) and engine.precision == "fp32"


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_openvino_keeps_the_exact_paths_image(method, request, example_image):
    """bf16 (fp32 on a CPU without bf16 units) against ONNX Runtime fp32, same seed: ≥ 35 dB."""
    engine_dir = request.getfixturevalue("svd_engines" if method == "svd" else "engines").root
    values = _inputs(method, example_image)
    with InProcessRunner(engine_dir) as runner:
        exact = _pixels(METHODS[method](runner, **values))
    with InProcessRunner(engine_dir, **engine_choice("openvino")) as runner:
        compiled = _pixels(METHODS[method](runner, **values))
    db = psnr(compiled / 255.0, exact / 255.0)
    print(f"\n{method}: openvino {PRECISION} vs ONNX Runtime fp32: PSNR {db:.1f} dB")
    assert db >= (BF16_PSNR_DB if BF16_CPU else 60.0)


def test_the_engine_core_serves_every_method_on_openvino(engines, svd_engines, example_image, tmp_path):
    """`ti2i serve --backend openvino`: each method served (gRPC stream and HTTP plain in turn) equals the
    in-process loop on the same OpenVINO engines."""
    methods = {"sd": [m for m in METHODS if m != "svd"], "svd": ["svd"]}
    roots = {"sd": engines.root, "svd": svd_engines.root}
    repository = write_family_repository({"sd": engines, "svd": svd_engines}, tmp_path / "repository",
                                         methods=methods, core_options=CoreOptions(backend="openvino"))
    order = [(family, m) for family, names in methods.items() for m in names]
    with TritonServer(repository, log_path=tmp_path / "server.log") as server:
        served = {m: run_remote(server_url(server, protocol), METHODS[m], progress=False, family=family,
                                stream=protocol == "grpc", **_inputs(m, example_image))
                  for (family, m), protocol in zip(order, ["grpc", "http"] * len(order))}
        assert f"openvino {PRECISION} on " in server.log_path.read_text()
    for family, names in methods.items():
        with InProcessRunner(roots[family], **engine_choice("openvino")) as runner:
            for method in names:
                local = METHODS[method](runner, **_inputs(method, example_image))
                np.testing.assert_array_equal(_pixels(served[method]), _pixels(local), err_msg=method)


def test_the_cli_runs_a_method_on_openvino_and_names_its_precision(engines, tmp_path, capsys):
    from conftest import EXAMPLE
    from ti2i.app.cli import main

    edit = ["sdedit", "--image", str(EXAMPLE), "--prompt", "a house", "--steps", "3", "--height", "32", "--width",
            "32", "--out", str(tmp_path / "edit.png"), "--backend", "openvino"]
    assert main([*edit, "--engines", str(engines.root)]) == 0
    assert f"engines: openvino {PRECISION} on " in capsys.readouterr().out
    assert (tmp_path / "edit.png").is_file()
    assert main([*edit, "--server", "grpc://127.0.0.1:1"]) == 2  # a server's engines are the server's choice
    assert "choose in-process engines" in capsys.readouterr().err
    assert main([*edit[:-1], "ort", "--precision", "bf16", "--engines", str(engines.root)]) == 2
