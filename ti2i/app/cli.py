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

EXIT_USAGE = 2


def cmd_tiny(args: argparse.Namespace) -> int:
    from ti2i.export.tiny import write_tiny_model

    print(f"wrote {write_tiny_model(args.kind, args.out, seed=args.seed)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ti2i.export.exporter import export_model

    manifest = export_model(args.model, args.out, kind=args.kind, motion_adapter=args.motion_adapter)
    print(f"wrote {manifest.root / 'manifest.json'} ({', '.join(manifest.components)})")
    return 0


def _repository_options(args: argparse.Namespace):
    from ti2i.triton_models.repository import RepositoryOptions

    return RepositoryOptions(max_queue_delay_us=args.max_queue_delay_us, instances=args.instances,
                             threads=args.threads)


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


def _method_models(args: argparse.Namespace, manifest) -> dict:
    """The method models to write next to the components: the --methods (default: every one the engines serve)."""
    from ti2i.triton_models.method_repository import MethodOptions, servable_methods

    if args.no_method_models:
        return {}
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else servable_methods(manifest.components)
    return {"methods": methods, "method_options": MethodOptions(active=args.method_instances,
                                                                max_queue=args.method_queue,
                                                                preload=args.preload_methods)}


def cmd_repository(args: argparse.Namespace) -> int:
    from ti2i.manifest import Manifest
    from ti2i.triton_models.repository import write_repository

    manifest = Manifest.load(args.engines)
    out = write_repository(manifest, args.out, _repository_options(args), models=_models(args, manifest),
                           **_method_models(args, manifest))
    print(f"wrote {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ti2i.manifest import Manifest
    from ti2i.triton_models.repository import write_repository
    from ti2i.triton_models.server import ServerPorts, TritonServer, serve_forever

    manifest = Manifest.load(args.engines)
    repository = write_repository(manifest, args.repository or manifest.root / "model_repository",
                                  _repository_options(args), models=_models(args, manifest),
                                  **_method_models(args, manifest))
    ports = ServerPorts(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port)
    return serve_forever(TritonServer(repository, ports=ports, log_path=args.log))


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
    p.set_defaults(func=cmd_export)

    for name, func, help_text in (("repository", cmd_repository, "generate the Triton model repository"),
                                  ("serve", cmd_serve, "serve an engine directory with the bundled Triton")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--engines", required=True)
        if name == "repository":
            p.add_argument("--out", required=True)
        else:
            p.add_argument("--repository", default=None, help="where to write the repository "
                                                              "(default: ENGINES/model_repository)")
            p.add_argument("--grpc-port", type=int, default=8001)
            p.add_argument("--http-port", type=int, default=8000)
            p.add_argument("--metrics-port", type=int, default=8002)
            p.add_argument("--log", type=Path, default=None, help="server log file")
        p.add_argument("--methods", default=None,
                       help=f"comma-separated methods to serve ({', '.join(METHODS)}); "
                            f"default: every model of the engine directory")
        p.add_argument("--max-queue-delay-us", type=int, default=0,
                       help="how long a request may wait for others to batch with (default 0: batch what queued)")
        p.add_argument("--instances", type=int, default=1)
        p.add_argument("--threads", type=int, default=0)
        p.add_argument("--method-instances", type=int, default=1,
                       help="requests each method model runs at once (one process each; default 1)")
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
