"""The `ti2i` command line: build, export, serve and run the methods.

Every error a user can fix is a `Ti2iError`: it is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ti2i.app.methods import add_method_parser
from ti2i.client.registry import METHODS
from ti2i.errors import InvalidInputError, Ti2iError
from ti2i.triton_models.method_server import DESIGNS, HOSTED

EXIT_USAGE = 2


def cmd_tiny(args: argparse.Namespace) -> int:
    from ti2i.export.tiny import write_tiny_model

    print(f"wrote {write_tiny_model(args.kind, args.out, seed=args.seed)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ti2i.export.exporter import export_model

    manifest = export_model(args.model, args.out, kind=args.kind, motion_adapter=args.motion_adapter,
                            precision=args.precision)
    print(f"wrote {manifest.root / 'manifest.json'} ({', '.join(manifest.components)})")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from ti2i.export.build import build

    build(args.engines, args.backend, components=args.components, limits=args.limit, device=args.device)
    return 0


def _repository_options(args: argparse.Namespace):
    from ti2i.budget import parse_bytes
    from ti2i.triton_models.repository import RepositoryOptions

    if args.max_queue_size < 0:
        raise InvalidInputError(f"--max-queue-size must be >= 0 (0: unbounded), got {args.max_queue_size}")
    return RepositoryOptions(max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                             threads=args.threads, max_queue_size=args.max_queue_size,
                             queue_timeout_us=int(args.queue_timeout_s * 1e6),
                             memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None)


def _models(args: argparse.Namespace, manifest) -> list[str] | None:
    """The components to serve: those the --methods need (all of the manifest's when not given)."""
    from ti2i.client.methods import components_for

    if not args.methods:
        return None
    names = components_for(m.strip() for m in args.methods.split(","))
    missing = [n for n in names if n not in manifest.components]
    if missing:
        raise InvalidInputError(f"{manifest.root} lacks {missing} needed by --methods {args.methods}")
    return names


def _method_models(args: argparse.Namespace, manifests: dict) -> dict:
    """The method models to write next to each family's components: the --methods it can serve (default:
    every method the family's engines serve)."""
    from ti2i.triton_models.method_repository import MethodOptions, servable_methods

    if args.no_method_models:
        return {}
    wanted = [m.strip() for m in args.methods.split(",")] if args.methods else None
    methods = {family: [m for m in servable_methods(manifest.components) if wanted is None or m in wanted]
               for family, manifest in manifests.items()}
    return {"methods": methods, "method_options": MethodOptions(design=args.method_design, active=args.method_instances,
                                                                processes=args.method_processes,
                                                                lanes=args.method_lanes,
                                                                threads=args.method_threads,
                                                                max_queue=args.method_queue,
                                                                preload=args.preload_methods)}


def _write_families(args: argparse.Namespace, out: Path | None):
    """The repository of every --engines family (default: in the first one's folder), limited by --methods."""
    from ti2i.client.methods import components_by_family
    from ti2i.families import parse_engine_dirs
    from ti2i.manifest import Manifest
    from ti2i.triton_models.families import write_family_repository

    manifests = {name: Manifest.load(path) for name, path in parse_engine_dirs(args.engines).items()}
    if None in manifests:
        models = {None: _models(args, manifests[None])}
    else:
        models = components_by_family(args.methods.split(","), manifests) if args.methods else None
    first = next(iter(manifests.values())).root
    return write_family_repository(manifests, out or first / "model_repository", _repository_options(args), models,
                                   **_method_models(args, manifests))


def cmd_repository(args: argparse.Namespace) -> int:
    if args.backend != "python":
        from ti2i.families import parse_engine_dirs
        from ti2i.manifest import Manifest
        from ti2i.triton_models.native import write_native_repository

        dirs = parse_engine_dirs(args.engines)
        if list(dirs) != [None]:
            raise InvalidInputError(f"--backend {args.backend} writes one engine directory's models: give one "
                                    f"--engines DIR")
        manifest = Manifest.load(dirs[None])
        out = write_native_repository(manifest, args.out, args.backend, _repository_options(args),
                                      models=_models(args, manifest))
        print(f"wrote {out}")
        return 0
    print(f"wrote {_write_families(args, Path(args.out))}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ti2i.triton_models.server import RESTRICTED_APIS, ServerPorts, TritonServer, serve_forever

    opened = {a.strip() for a in (args.open_apis or "").split(",") if a.strip()}
    if opened - set(RESTRICTED_APIS):
        raise InvalidInputError(f"--open-apis: unknown {sorted(opened - set(RESTRICTED_APIS))} "
                                f"(restricted by default: {', '.join(RESTRICTED_APIS)})")
    if args.http_max_body_mb <= 0:
        raise InvalidInputError(f"--http-max-body-mb must be > 0, got {args.http_max_body_mb}")
    repository = _write_families(args, Path(args.repository) if args.repository else None)
    ports = ServerPorts(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port)
    server = TritonServer(repository, ports=ports, log_path=args.log, api_key=args.api_key,
                          restricted_apis=[a for a in RESTRICTED_APIS if a not in opened],
                          max_http_body_bytes=int(args.http_max_body_mb * 1024 * 1024), supervise=not args.no_supervise)
    return serve_forever(server)


def cmd_demo(args: argparse.Namespace) -> int:
    from ti2i.app.demo import run_demo

    return run_demo(Path(args.work), Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ti2i", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a tiny random-weight model folder (offline)")
    p.add_argument("--kind", default="sd")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    p = sub.add_parser("export", help="export a diffusers model (hub id or folder) to ONNX engines")
    p.add_argument("--model", required=True, help="hub id or local diffusers folder")
    p.add_argument("--out", required=True, help="engine directory to write")
    p.add_argument("--kind", default=None, help="model kind (detected from the folder when left out)")
    p.add_argument("--motion-adapter", default=None,
                   help="AnimateDiff motion adapter (hub id or folder): also export the Video LDM temporal UNet")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="graph precision (fp16: components known to overflow stay fp32; each is validated "
                        "against the fp32 module)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="compile an engine directory's ONNX graphs: TensorRT plans or AOTInductor "
                                     "packages, cached beside them")
    p.add_argument("--engines", required=True, help="engine directory written by `ti2i export`")
    p.add_argument("--backend", required=True, choices=("tensorrt", "aoti"))
    p.add_argument("--components", default=None, help="comma-separated components (default: every ONNX one)")
    p.add_argument("--limit", default=None, help="cap declared dims for the build, e.g. batch=4,height=128 "
                                                 "(a plan's memory grows with its profile's max)")
    p.add_argument("--device", default=None, help="aoti: cpu or cuda (default: cuda when torch sees a GPU)")
    p.set_defaults(func=cmd_build)

    for name, func, help_text in (("repository", cmd_repository, "generate the Triton model repository"),
                                  ("serve", cmd_serve, "serve an engine directory with the bundled Triton")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--engines", required=True, action="append",
                       help="engine directory; NAME=DIR, repeated, serves several model families side by side "
                            "(their models named NAME.MODEL)")
        if name == "repository":
            p.add_argument("--out", required=True)
            p.add_argument("--backend", choices=("python", "tensorrt", "onnxruntime", "aoti"), default="python",
                           help="python: python-backend models hosting the engines (CPU or GPU); tensorrt: "
                                "tensorrt_plan models (plans from `ti2i build`); onnxruntime: onnxruntime_onnx "
                                "models on the CUDA provider; both native ones on GPU instances; aoti: torch_aoti "
                                "models (pytorch backend, Triton 26.03+) of the packages `ti2i build --backend aoti` "
                                "wrote, on their build's device")
        else:
            p.add_argument("--repository", default=None, help="where to write the repository "
                                                              "(default: ENGINES/model_repository)")
            p.add_argument("--grpc-port", type=int, default=8001)
            p.add_argument("--http-port", type=int, default=8000)
            p.add_argument("--metrics-port", type=int, default=8002)
            p.add_argument("--log", type=Path, default=None, help="server log file")
            p.add_argument("--api-key", default=None,
                           help="key of the restricted APIs, sent as header ti2i-api-key "
                                "(default: $TI2I_API_KEY, else a random one, printed at start)")
            p.add_argument("--open-apis", default=None,
                           help="comma-separated API groups to open to every client (restricted by default: "
                                "shared-memory, model-repository, logging, trace, statistics)")
            p.add_argument("--http-max-body-mb", type=float, default=64.0,
                           help="largest HTTP request body accepted (MiB; larger ones get 413)")
            p.add_argument("--no-supervise", action="store_true",
                           help="do not reload models whose python-backend stub died, nor restart a dead server")
        p.add_argument("--methods", default=None,
                       help=f"comma-separated methods to serve ({', '.join(METHODS)}); "
                            f"default: every model of the engine directory")
        p.add_argument("--max-queue-delay-us", type=int, default=0,
                       help="how long a request may wait for others to batch with (default 0: batch what queued)")
        p.add_argument("--max-queue-size", type=int, default=32,
                       help="requests that may wait per component model; one more is refused with UNAVAILABLE "
                            "(default 32; 0: unbounded, no queue policy, which also spares requests the 500 ms stall "
                            "Triton's batcher can give a model with a queue policy)")
        p.add_argument("--queue-timeout-s", type=float, default=30.0,
                       help="a request that waited this long without starting is refused (default 30; a request's "
                            "own shorter timeout wins)")
        p.add_argument("--memory-budget", default=None,
                       help="memory all model instances may use together, e.g. 8G (default: TI2I_MEMORY_BUDGET, else "
                            "60%% of the memory available); requests that would exceed an instance's share are refused")
        p.add_argument("--instances", type=int, default=1)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--method-design", choices=DESIGNS, default=HOSTED,
                       help="hosted (default): each method model holds the engines it calls and batches the steps "
                            "of its active requests; bls: it calls the component models (less memory)")
        p.add_argument("--method-instances", type=int, default=1,
                       help="requests each method model runs at once (hosted: loops of its processes; bls: one "
                            "process each; default 1)")
        p.add_argument("--method-processes", type=int, default=1,
                       help="hosted: spread those requests' loops over this many processes, each with its own copy "
                            "of the engines (more throughput from concurrent requests, more memory; default 1)")
        p.add_argument("--method-lanes", type=int, default=1,
                       help="hosted: split each process's requests into this many lanes that tick on their own, so "
                            "one lane's engine call runs beside another's Python work (throughput from concurrent "
                            "requests with one copy of the engines; default 1)")
        p.add_argument("--method-threads", type=int, default=0,
                       help="hosted: intra-op threads of each process's engines (default: the cores divided among "
                            "the processes and their lanes)")
        p.add_argument("--method-queue", type=int, default=8,
                       help="requests a method model queues beyond those; more are rejected (default 8)")
        p.add_argument("--preload-methods", action="store_true",
                       help="method models import their loop (torch) when they load, not at their first request")
        p.add_argument("--no-method-models", action="store_true",
                       help="only the components and ensembles (clients run the loops)")
        p.set_defaults(func=func)

    for method in METHODS.values():  # one subcommand per method record
        add_method_parser(sub, method)

    p = sub.add_parser("demo", help="the end-to-end demo on a tiny model through a real Triton server")
    p.add_argument("--work", default="work", help="folder for the model, engines and repository")
    p.add_argument("--out", default="outputs", help="folder for the results")
    p.set_defaults(func=cmd_demo)

    from ti2i.benchmarks.cli import add_parser as add_bench_parser

    add_bench_parser(sub)  # `ti2i bench`
    from ti2i.kubernetes import add_parser as add_kubernetes_parser

    add_kubernetes_parser(sub)  # `ti2i kubernetes`
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Ti2iError as err:
        print(f"ti2i {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
