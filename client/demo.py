"""`make demo`: the whole path on a tiny random-weight model, through a real Triton server.

tiny model -> ONNX export (validated) -> Triton model repository -> bundled tritonserver on
127.0.0.1 -> each method through the gRPC client -> outputs/, with per-stage latencies.
"""

from __future__ import annotations

import time
from pathlib import Path

from ti2i.client.runners import TritonRunner
from ti2i.client.sdedit import sdedit
from ti2i.export.exporter import export_model
from ti2i.export.tiny import write_tiny_model
from ti2i.triton_models.repository import write_repository
from ti2i.triton_models.server import TritonServer

DEMO_IMAGE = Path("examples/input.png")


def run_demo(work: Path, out: Path, image: Path = DEMO_IMAGE) -> int:
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    print("== 1. tiny random-weight Stable Diffusion model (offline)")
    model = write_tiny_model("sd", work / "model-sd")

    print("== 2. ONNX export, validated against torch")
    manifest = export_model(str(model), work / "engines-sd")

    print("== 3. Triton model repository")
    repository = write_repository(manifest, work / "model_repository")
    print(f"wrote {repository}")

    print("== 4. tritonserver on 127.0.0.1")
    start = time.perf_counter()
    with TritonServer(repository, log_path=work / "tritonserver.log") as server:
        print(f"ready in {time.perf_counter() - start:.1f} s: grpc {server.grpc_url}, http {server.http_url}")
        with TritonRunner(f"grpc://{server.grpc_url}") as runner:
            print("== 5. SDEdit over gRPC")
            result = sdedit(runner, image, "a watercolor painting of hills at sunset", seed=0)
            target = out / "sdedit.png"
            result.image.save(target)
            print(result.timings.report())
            print(f"wrote {target}")
    print("== server stopped")
    return 0
