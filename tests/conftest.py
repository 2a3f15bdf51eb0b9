"""Shared fixtures: one tiny SD model, its exported engines and one real Triton server per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_random_lora, write_tiny_model
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

from ti2i.manifest import Manifest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "input.png"
# Export measures each engine's memory up to this growth (default 1 GiB): enough for the tiny models, and cheap.
os.environ.setdefault("TI2I_CALIBRATION_BYTES", str(64 * 1024**2))


@pytest.fixture(scope="session")
def sd_model(tmp_path_factory) -> Path:
    return write_tiny_model("sd", tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="session")
def pix2pix_model(tmp_path_factory) -> Path:
    """Shares the text encoder and VAE of `sd_model` (same seed), like instruct-pix2pix shares SD 1.5's."""
    return write_tiny_model("pix2pix", tmp_path_factory.mktemp("models") / "pix2pix")


@pytest.fixture(scope="session")
def inpaint_model(tmp_path_factory) -> Path:
    """A 9-channel inpainting UNet sharing the text encoder and VAE of `sd_model` (same seed)."""
    return write_tiny_model("inpaint", tmp_path_factory.mktemp("models") / "inpaint")


@pytest.fixture(scope="session")
def motion_adapter(tmp_path_factory) -> Path:
    """A tiny AnimateDiff motion adapter matching `sd_model` (whose weights `videoldm`'s sd/ repeats)."""
    return write_tiny_model("videoldm", tmp_path_factory.mktemp("models") / "videoldm") / "motion_adapter"


@pytest.fixture(scope="session")
def lora_adapters(sd_model, tmp_path_factory) -> tuple[Path, Path]:
    """Two random LoRA adapters of `sd_model` (`write_random_lora`): "style" on the UNet and the text encoder,
    "detail" on the UNet only."""
    root = tmp_path_factory.mktemp("loras")
    return (write_random_lora(sd_model, root / "style", 1, text_encoder=True),
            write_random_lora(sd_model, root / "detail", 2, text_encoder=False))


@pytest.fixture(scope="session")
def engines(sd_model, pix2pix_model, inpaint_model, motion_adapter, tmp_path_factory) -> Manifest:
    """One engine directory with the SD components, the 8- and 9-channel UNets and the temporal UNet side by side."""
    root = tmp_path_factory.mktemp("engines") / "sd"
    export_model(str(sd_model), root, log=lambda _: None)
    export_model(str(pix2pix_model), root, log=lambda _: None)
    export_model(str(inpaint_model), root, log=lambda _: None)
    return export_model(str(sd_model), root, log=lambda _: None, motion_adapter=str(motion_adapter))


@pytest.fixture(scope="session")
def sd_engines(engines) -> Manifest:
    return engines


@pytest.fixture(scope="session")
def triton_server(engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    repository = write_repository(engines, root / "repository")
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory) -> Path:
    return write_tiny_model("sdxl", tmp_path_factory.mktemp("models") / "sdxl")


@pytest.fixture(scope="session")
def sdxl16_engines(sdxl_model, tmp_path_factory) -> Manifest:
    return export_model(str(sdxl_model), tmp_path_factory.mktemp("engines") / "sdxl16", log=lambda _: None,
                        precision="fp16")


@pytest.fixture(scope="session")
def sdxl_models(sdxl_model, tmp_path_factory) -> dict[str, Path]:
    """The tiny SDXL base, InstructPix2Pix, inpainting and refiner folders: one seed, so one text encoder pair
    and VAE."""
    root = tmp_path_factory.mktemp("models")
    kinds = ("sdxl_pix2pix", "sdxl_inpaint", "sdxl_refiner")
    return {"sdxl": sdxl_model, **{kind: write_tiny_model(kind, root / kind) for kind in kinds}}


@pytest.fixture(scope="session")
def sdxl_engines(sdxl_models, tmp_path_factory) -> Manifest:
    """One SDXL engine directory: the shared encoders and VAE, the 4-, 8- and 9-channel UNets, the refiner's."""
    root = tmp_path_factory.mktemp("engines") / "sdxl"
    for model in sdxl_models.values():
        manifest = export_model(str(model), root, log=lambda _: None)
    return manifest


@pytest.fixture(scope="session")
def example_image() -> Image.Image:
    """The shipped example, at 64×48 so the tiny pipelines stay fast (non-square on purpose)."""
    return Image.open(EXAMPLE).convert("RGB").resize((64, 48), Image.LANCZOS)


def server_url(server: TritonServer, protocol: str) -> str:
    return f"{protocol}://{server.grpc_url if protocol == 'grpc' else server.http_url}"


def served_and_local(server: TritonServer, protocol: str, engine_dir: Path, run):
    """The same method call through the server (gRPC or HTTP) and in-process on the same engines."""
    from ti2i.client.runners import InProcessRunner, TritonRunner

    with TritonRunner(server_url(server, protocol)) as runner:
        served = run(runner)
    with InProcessRunner(engine_dir) as runner:
        local = run(runner)
    return served, local


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="session")
def svd_model(tmp_path_factory) -> Path:
    return write_tiny_model("svd", tmp_path_factory.mktemp("models") / "svd")


@pytest.fixture(scope="session")
def svd_engines(svd_model, tmp_path_factory) -> Manifest:
    """SVD has its own VAE and no text encoder: its own engine directory."""
    return export_model(str(svd_model), tmp_path_factory.mktemp("engines") / "svd", log=lambda _: None)


@pytest.fixture(scope="session")
def svd_server(svd_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("triton-svd")
    repository = write_repository(svd_engines, root / "repository")
    with TritonServer(repository, log_path=root / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def sd16_engines(sd_model, tmp_path_factory) -> Manifest:
    """The tiny SD model exported in fp16 (its own directory: precision is per directory)."""
    return export_model(str(sd_model), tmp_path_factory.mktemp("engines") / "sd16", log=lambda _: None,
                        precision="fp16")


@pytest.fixture(scope="session")
def svd16_engines(svd_model, tmp_path_factory) -> Manifest:
    return export_model(str(svd_model), tmp_path_factory.mktemp("engines") / "svd16", log=lambda _: None,
                        precision="fp16")


