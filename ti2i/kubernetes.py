"""Kubernetes manifests for a ti2i deployment: plain YAML that `kubectl apply -k` applies as it is.

`render` builds every document from `KubernetesSettings` (image, families, replica bounds, queue-wait
target, ...); `write` puts them in a folder with a `kustomization.yaml`. The folder
`deploy/kubernetes/` is this module's output for the default settings (a test keeps it so), and
`ti2i kubernetes --out DIR ...` writes one for other settings. Plain manifests rather than a Helm
chart: they render and validate offline in Python (Helm is a Go binary, not on PyPI), a cluster
applies them with nothing but kubectl's built-in kustomize, and an overlay can still patch them.

What is in it: a Deployment of the container running `ti2i serve`, as a machine does (HTTP guard, supervisor,
restricted APIs; GPU request, engines on a read-only volume, startup/readiness/liveness probes on Triton's
health endpoints, metrics scraped by Prometheus, the restricted-API key from a Secret), a Service for HTTP,
gRPC and metrics plus a headless one for per-pod client balancing, a HorizontalPodAutoscaler on the mean
wait per request in the engine cores' queues, a PodDisruptionBudget, and the Prometheus adapter rule that
turns the cores' queue-wait histogram into that metric.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ti2i.errors import InvalidInputError
from ti2i.families import check_family_name
from ti2i.triton_models.core_metrics import QUEUE_WAIT  # the histogram the engine cores export
from ti2i.triton_models.server import API_KEY_ENV  # the key `ti2i serve` reads, named once

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
QUEUE_METRIC = "ti2i_queue_wait_per_request_seconds"  # the custom metric the adapter rule serves to the HPA
REPOSITORY = "/tmp/model_repository"  # the engines volume is read-only: the repository goes to the emptyDir
LOG = "/tmp/tritonserver.log"
KUSTOMIZATION = "kustomization.yaml"
ADAPTER_VALUES = "prometheus-adapter-values.yaml"


@dataclass(frozen=True)
class KubernetesSettings:
    image: str = "ti2i:0.1.0"
    families: tuple[str, ...] = ("sd15", "svd")  # each served from /engines/<family> on the engines volume
    min_replicas: int = 1
    max_replicas: int = 4
    # The HPA adds replicas while the mean queue wait per request exceeds this (ms); see docs/serving.md's capacity note.
    queue_wait_target_ms: int = 500
    gpus: int = 1
    cpu: str = "4"
    memory: str = "32Gi"
    shm_size: str = "8Gi"  # /dev/shm for the python backend's tensors (a container's default is 64 MB)
    engines_claim: str = "ti2i-engines"
    create_claim: bool = True  # False: the claim exists already (filled by `ti2i export`)
    engines_size: str = "200Gi"
    api_key_secret: str = "ti2i-api-key"  # a Secret with key `key`; see docs/serving.md
    name: str = "ti2i"
    namespace: str | None = None
    # The first start may build TensorRT plans for this GPU before Triton is ready: the startup probe waits
    # this long before the liveness probe may restart the pod.
    startup_budget_s: int = 1800
    labels: dict[str, str] = field(default_factory=dict)

    def check(self) -> KubernetesSettings:
        if not self.image.strip():
            raise InvalidInputError("the container image must not be empty")
        if not self.families:
            raise InvalidInputError("give at least one model family")
        for family in self.families:
            check_family_name(family)
        if len(set(self.families)) != len(self.families):
            raise InvalidInputError(f"a family is given twice: {', '.join(self.families)}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InvalidInputError(f"replica bounds must satisfy 1 <= min ({self.min_replicas}) <= max "
                                    f"({self.max_replicas})")
        if self.queue_wait_target_ms <= 0 or self.gpus < 0 or self.startup_budget_s < 10:
            raise InvalidInputError("queue-wait target and startup budget must be positive, GPUs not negative")
        return self


def _labels(s: KubernetesSettings) -> dict[str, str]:
    return {"app.kubernetes.io/name": s.name, "app.kubernetes.io/component": "triton", **s.labels}


def _meta(s: KubernetesSettings, name: str, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(s), **extra}
    if s.namespace:
        meta["namespace"] = s.namespace
    return meta


def container_command(s: KubernetesSettings) -> str:
    """`ti2i serve` of every family on the engines volume, as on a machine: the container's tritonserver behind the
    HTTP guard, supervised, its published ports on every address (Triton's own HTTP port on loopback)."""
    key = f'"${{{API_KEY_ENV}}}"'  # expanded by the shell: the key never appears in the pod spec
    lines = ["exec ti2i serve", *(f"--engines {f}=/engines/{f}" for f in s.families),
             f"--repository {REPOSITORY} --log {LOG}",
             f"--host 0.0.0.0 --http-port {HTTP_PORT} --grpc-port {GRPC_PORT} --metrics-port {METRICS_PORT}",
             f"--api-key {key}"]
    return " \\\n  ".join(lines) + "\n"


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 5,
            "failureThreshold": failures}


def deployment(s: KubernetesSettings) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": s.cpu, "memory": s.memory}, "limits": {"memory": s.memory}}
    if s.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = s.gpus
    container = {
        "name": "triton",
        "image": s.image,
        "command": ["sh", "-c", container_command(s)],
        "env": [{"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": s.api_key_secret, "key": "key"}}},
                {"name": "HOME", "value": "/tmp"}],  # the root filesystem is read-only
        "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": resources,
        "startupProbe": _probe("/v2/health/ready", 10, max(1, s.startup_budget_s // 10)),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 6),
        "volumeMounts": [{"name": "engines", "mountPath": "/engines", "readOnly": True},
                         {"name": "repository", "mountPath": "/tmp"},
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
    }
    pod = {
        "metadata": {"labels": _labels(s), "annotations": {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}},
        "spec": {
            "containers": [container],
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
            "terminationGracePeriodSeconds": 45,  # `ti2i serve` stops Triton (and its stubs) within 30 s
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "volumes": [{"name": "engines", "persistentVolumeClaim": {"claimName": s.engines_claim, "readOnly": True}},
                        {"name": "repository", "emptyDir": {}},
                        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": s.shm_size}}],
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(s, s.name),
            "spec": {"replicas": s.min_replicas, "selector": {"matchLabels": _labels(s)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": pod}}


def services(s: KubernetesSettings) -> list[dict[str, Any]]:
    ports = [{"name": "http", "port": HTTP_PORT, "targetPort": "http"},
             {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
             {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]
    return [{"apiVersion": "v1", "kind": "Service", "metadata": _meta(s, s.name),
             "spec": {"type": "ClusterIP", "selector": _labels(s), "ports": ports}},
            # every ready pod's address in DNS: for clients that balance per call themselves (TritonRunner)
            {"apiVersion": "v1", "kind": "Service", "metadata": _meta(s, f"{s.name}-pods"),
             "spec": {"clusterIP": "None", "selector": _labels(s), "ports": ports[:2]}}]


def autoscaler(s: KubernetesSettings) -> dict[str, Any]:
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                       "target": {"type": "AverageValue",
                                                  "averageValue": f"{s.queue_wait_target_ms}m"}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(s, s.name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": s.name},
                     "minReplicas": s.min_replicas, "maxReplicas": s.max_replicas, "metrics": [metric],
                     # a replica is slow to start (model load, maybe a plan build): add fast, remove slowly
                     "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0,
                                              "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                                  "scaleDown": {"stabilizationWindowSeconds": 600,
                                                "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]}}}}


def disruption_budget(s: KubernetesSettings) -> dict[str, Any]:
    # maxUnavailable, not minAvailable: with one replica a node drain may still proceed
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(s, s.name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(s)}}}


def engines_claim(s: KubernetesSettings) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(s, s.engines_claim),
            "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": s.engines_size}}}}


def adapter_rule() -> dict[str, Any]:
    """prometheus-adapter rule: the mean wait of a method request in the engine cores' queues (seconds) per pod,
    over the last minute, from the cores' histogram: what requests really wait, where Triton's own queue time
    only sees the entry points' short hand-off to the core."""
    selector = "<<.LabelMatchers>>"
    total, count = f"{QUEUE_WAIT}_sum", f"{QUEUE_WAIT}_count"
    return {
        "seriesQuery": f'{total}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{total}$", "as": QUEUE_METRIC},
        # summed over the pod's cores and methods; an idle pod (no requests) waits 0
        "metricsQuery": (f"sum(rate({total}{{{selector}}}[1m])) by (<<.GroupBy>>) / "
                         f"clamp_min(sum(rate({count}{{{selector}}}[1m])) by (<<.GroupBy>>), 0.001)"),
    }


HEADER = """# Generated by `ti2i kubernetes` (ti2i/kubernetes.py): change its settings, or patch in an overlay.
"""


def render(settings: KubernetesSettings = KubernetesSettings()) -> dict[str, list[dict[str, Any]]]:
    """File name -> its documents: the resources `kubectl apply -k` applies, and the adapter's Helm values."""
    s = settings.check()
    files = {"engines-pvc.yaml": [engines_claim(s)]} if s.create_claim else {}
    files.update({"deployment.yaml": [deployment(s)], "service.yaml": services(s), "hpa.yaml": [autoscaler(s)],
                  "pdb.yaml": [disruption_budget(s)]})
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                     "resources": list(files)}
    if s.namespace:
        kustomization["namespace"] = s.namespace
    files[KUSTOMIZATION] = [kustomization]
    # prometheus-community/prometheus-adapter chart values: install the adapter with `-f` this file
    files[ADAPTER_VALUES] = [{"rules": {"default": False, "custom": [adapter_rule()]}}]
    return files


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the container's command) as literal blocks, readable as the shell will run them."""


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def dump(documents: list[dict[str, Any]]) -> str:
    return HEADER + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in documents)


def write(settings: KubernetesSettings, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, documents in render(settings).items():
        (out / name).write_text(dump(documents))
        paths.append(out / name)
    return paths


def add_parser(sub: Any) -> None:
    """`ti2i kubernetes`: write the manifests for some settings."""
    d = KubernetesSettings()
    p = sub.add_parser("kubernetes", help="write Kubernetes manifests (kubectl apply -k DIR)")
    p.add_argument("--out", required=True, help="folder to write (kustomization.yaml and the resources)")
    p.add_argument("--image", default=d.image, help=f"container image (default {d.image})")
    p.add_argument("--families", default=",".join(d.families),
                   help="comma-separated model families, each an engine directory /engines/NAME on the volume")
    p.add_argument("--min-replicas", type=int, default=d.min_replicas, help="the autoscaler's fewest replicas")
    p.add_argument("--max-replicas", type=int, default=d.max_replicas, help="the autoscaler's most replicas")
    p.add_argument("--queue-wait-target-ms", type=int, default=d.queue_wait_target_ms,
                   help="mean wait per request in the engine cores' queues the autoscaler holds (ms; default "
                        "%(default)s)")
    p.add_argument("--gpus", type=int, default=d.gpus, help="GPUs per replica")
    p.add_argument("--namespace", default=None, help="the manifests' namespace (default: none set)")
    p.add_argument("--engines-claim", default=d.engines_claim, help="PersistentVolumeClaim holding the engines")
    p.add_argument("--existing-claim", action="store_true", help="the claim exists already: do not create it")
    p.set_defaults(func=cmd_kubernetes)


def cmd_kubernetes(args: argparse.Namespace) -> int:
    settings = replace(KubernetesSettings(), image=args.image, families=_split(args.families),
                       min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       queue_wait_target_ms=args.queue_wait_target_ms, gpus=args.gpus, namespace=args.namespace,
                       engines_claim=args.engines_claim, create_claim=not args.existing_claim)
    for path in write(settings, args.out):
        print(f"wrote {path}")
    return 0


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def load(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Every document of the given YAML files (for validation)."""
    return [doc for path in paths for doc in yaml.safe_load_all(Path(path).read_text()) if doc]
