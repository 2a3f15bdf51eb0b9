"""The Kubernetes manifests: rendered for any settings, valid against Kubernetes' own schemas, offline."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ti2i.app.cli import build_parser, cmd_serve
from ti2i.client.cli import main
from ti2i.kubernetes import ADAPTER_VALUES, KUSTOMIZATION, QUEUE_METRIC, KubernetesSettings, dump, load, render

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"


def resources(folder: Path) -> list[dict]:
    """The documents `kubectl apply -k folder` would apply: those its kustomization lists."""
    kustomization = yaml.safe_load((folder / KUSTOMIZATION).read_text())
    return load([folder / name for name in kustomization["resources"]])


def test_the_committed_manifests_are_the_default_rendering():
    rendered = render(KubernetesSettings())
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == sorted(rendered)
    for name, documents in rendered.items():
        assert (DEPLOY / name).read_text() == dump(documents), f"{name}: run `ti2i kubernetes --out deploy/kubernetes`"
    for document in resources(DEPLOY):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_custom_settings_render_valid_manifests(tmp_path, capsys):
    out = tmp_path / "overlay"
    assert main(["kubernetes", "--out", str(out), "--image", "registry.example.com/gen/ti2i:2.1.0",
                 "--families", "sd21,svd-xt,sdxl", "--min-replicas", "2", "--max-replicas", "9",
                 "--queue-wait-target-ms", "2500", "--namespace", "gen", "--existing-claim",
                 "--engines-claim", "shared-engines"]) == 0
    documents = resources(out)
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    by_kind = {}
    for d in documents:
        by_kind.setdefault(d["kind"], []).append(d)
    assert "PersistentVolumeClaim" not in by_kind  # an existing claim is used, not created
    assert all(d["metadata"]["namespace"] == "gen" for d in documents)
    (deployment,) = by_kind["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/gen/ti2i:2.1.0"
    assert deployment["spec"]["replicas"] == 2
    for family in ("sd21", "svd-xt", "sdxl"):
        assert f"--engines {family}=/engines/{family}" in container["command"][2]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "shared-engines", "readOnly": True}
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    (hpa,) = by_kind["HorizontalPodAutoscaler"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 9)
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == QUEUE_METRIC and metric["target"]["averageValue"] == "2500m"  # 2.5 s
    (rule,) = yaml.safe_load((out / ADAPTER_VALUES).read_text())["rules"]["custom"]
    assert rule["name"]["as"] == QUEUE_METRIC
    # the mean wait per request: the cores' histogram sum over its count, both as rates
    assert re.fullmatch(r"sum\(rate\(ti2i_queue_wait_seconds_sum\{.*\}\[1m\]\)\) by \(.*\) / "
                        r"clamp_min\(sum\(rate\(ti2i_queue_wait_seconds_count\{.*\}\[1m\]\)\) by \(.*\), .*\)",
                        rule["metricsQuery"]), rule["metricsQuery"]
    ports = {p["name"]: p["port"] for s in by_kind["Service"] for p in s["spec"]["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert by_kind["PodDisruptionBudget"][0]["spec"]["maxUnavailable"] == 1


def test_the_container_command_runs_as_written(tmp_path):
    """The pod's shell command, run with a stand-in for ti2i that records its arguments: `ti2i serve` as the CLI
    parses it, the key from the Secret's variable."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ti2i"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {tmp_path / "ti2i.args"}\n')
    script.chmod(0o755)
    (container,) = render(KubernetesSettings(families=("a", "b")))["deployment.yaml"][0]["spec"]["template"]["spec"][
        "containers"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TI2I_API_KEY": "s3cret"}
    subprocess.run(container["command"], env=env, check=True, timeout=30)
    argv = (tmp_path / "ti2i.args").read_text().splitlines()
    assert argv[:5] == ["serve", "--engines", "a=/engines/a", "--engines", "b=/engines/b"]
    args = build_parser().parse_args(argv)
    assert args.func is cmd_serve and not args.no_supervise
    assert (args.api_key, args.host, args.repository) == ("s3cret", "0.0.0.0", "/tmp/model_repository")
    assert (args.http_port, args.grpc_port, args.metrics_port) == (8000, 8001, 8002)
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}
    assert "s3cret" not in yaml.safe_dump(container)  # the key comes from the Secret at run time only


@pytest.mark.parametrize("args, words", [
    (["--min-replicas", "5", "--max-replicas", "2"], "replica bounds"),
    (["--families", "sd.15"], "family name"),
    (["--image", " "], "image"),
])
def test_bad_settings_are_one_line_errors(args, words, tmp_path, capsys):
    assert main(["kubernetes", "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err
