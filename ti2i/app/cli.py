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
from ti2i.engines.loader import ENGINE_BACKENDS
from ti2i.engines.openvino import PRECISIONS
from ti2i.triton_models.core import CoreOptions
from ti2i.work_limits import WorkLimits

EXIT_USAGE = 2


def cmd_tiny(args: argparse.Namespace) -> int:
    from ti2i.export.tiny import write_tiny_model

    print(f"wrote {write_tiny_model(args.kind, args.out, seed=args.seed)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ti2i.export.exporter import export_model

    manifest = export_model(args.model, args.out, kind=args.kind, motion_adapter=args.motion_adapter,
                            precision=args.precision, loras=args.lora or (), controlnets=args.controlnet or ())
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
        raise InvalidInputError(f"--max-queue-size must be >= 0, got {args.max_queue_size}")
    return RepositoryOptions(max_queue_delay_us=getattr(args, "max_queue_delay_us", 0),
                             instances=getattr(args, "instances", 1), threads=args.threads,
                             max_queue_size=args.max_queue_size, queue_timeout_us=int(args.queue_timeout_s * 1e6),
                             memory_budget=parse_bytes(args.memory_budget) if args.memory_budget else None)


def _core_options(args: argparse.Namespace) -> CoreOptions:
    return CoreOptions(active=args.active, max_queue=args.max_queue_size, queue_timeout_s=args.queue_timeout_s,
                       threads=args.threads, backend=args.engine_backend, precision=args.precision,
                       device=args.device,
                       limits=WorkLimits(max_steps=args.max_steps, max_pixels=args.max_pixels),
                       adapters=_adapters(args.lora or ()))


def _adapters(texts: list[str]) -> tuple[tuple[str, str], ...]:
    """``NAME=PATH`` of each ``--lora``: the name requests use, the adapter file or folder (absolute)."""
    named: dict[str, str] = {}
    for text in texts:
        name, sep, path = text.partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InvalidInputError(f"--lora {text!r}: give NAME=PATH (the name requests use, the adapter file)")
        if any(c in name for c in ",:") or name in named:
            raise InvalidInputError(f"--lora {text!r}: a name is unique and holds no ',' or ':' (they separate "
                                    f"adapters and scales in a request)")
        if not Path(path).exists():
            raise InvalidInputError(f"--lora {text!r}: {path} does not exist")
        named[name] = str(Path(path).resolve())
    return tuple(named.items())


def _check_adapters(options: CoreOptions, manifests: dict) -> None:
    """Each registered adapter read and fitted to every family that takes adapters: a bad one fails here."""
    from ti2i.engines.adapters import ADAPTER_MODULES, AdapterRegistry

    for manifest in manifests.values():
        if options.adapters and manifest.pipeline.get(ADAPTER_MODULES):
            AdapterRegistry(manifest.pipeline[ADAPTER_MODULES], dict(options.adapters))


def _models(args: argparse.Namespace, manifest) -> list[str] | None:
    """The components to serve: those the --methods need (all of the manifest's when not given)."""
    from ti2i.client.methods import components_for

    if not args.methods:
        return None
    names = components_for((m.strip() for m in args.methods.split(",")), manifest.components)
    missing = [n for n in names if n not in manifest.components]
    if missing:
        raise InvalidInputError(f"{manifest.root} lacks {missing} needed by --methods {args.methods}")
    return names


def _method_models(args: argparse.Namespace, manifests: dict) -> dict:
    """The method models to write next to each family's components: the --methods it can serve (default:
    every method the family's engines serve)."""
    from ti2i.triton_models.method_repository import servable_methods

    if args.no_method_models:
        return {family: [] for family in manifests}
    wanted = [m.strip() for m in args.methods.split(",")] if args.methods else None
    return {family: [m for m in servable_methods(manifest.components) if wanted is None or m in wanted]
            for family, manifest in manifests.items()}


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
    repository = _repository_options(args)
    options = _core_options(args)
    _check_adapters(options, manifests)
    return write_family_repository(manifests, out or first / "model_repository", repository, models,
                                   methods=_method_models(args, manifests), core_options=options)


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
    _check_ports_free(args.host, {"--grpc-port": args.grpc_port, "--http-port": args.http_port,
                                  "--metrics-port": args.metrics_port})
    repository = _write_families(args, Path(args.repository) if args.repository else None)
    ports = ServerPorts(grpc=args.grpc_port, http=args.http_port, metrics=args.metrics_port)
    server = TritonServer(repository, ports=ports, log_path=args.log, api_key=args.api_key,
                          restricted_apis=[a for a in RESTRICTED_APIS if a not in opened],
                          max_http_body_bytes=int(args.http_max_body_mb * 1024 * 1024), supervise=not args.no_supervise,
                          host=args.host, openai_api_key=args.openai_api_key)
    return serve_forever(server)


def _check_ports_free(host: str, ports: dict[str, int]) -> None:
    """One line naming the flag for a published port another process holds, before anything starts."""
    import errno
    import socket

    for flag, port in ports.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise InvalidInputError(f"port {port} on {host} is in use: choose another with {flag}") from None
                raise InvalidInputError(f"cannot bind {host}:{port} ({flag}): {err.strerror}") from None


class _HelpFormatter(argparse.HelpFormatter):
    """Every flag's default in its help, unless it has none or its help says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def cmd_demo(args: argparse.Namespace) -> int:
    from ti2i.app.demo import run_demo

    return run_demo(Path(args.work), Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ti2i", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write a tiny random-weight model folder (offline)")
    p.add_argument("--kind", default="sd", help="which model: sd, pix2pix, inpaint, svd, videoldm, sdxl, "
                                                "sdxl_pix2pix, sdxl_inpaint or sdxl_refiner")
    p.add_argument("--out", required=True, help="the model folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
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
    p.add_argument("--lora", action="append", default=None, metavar="PATH[:SCALE]",
                   help="a LoRA adapter in diffusers' format (file or folder) fused into the UNet and text encoder "
                        "at SCALE (default 1); repeated, the adapters add")
    p.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                   help="a diffusers ControlNet folder or hub id (repeatable): served as controlnet_<its name>, with "
                        "the UNet that takes its residuals (txt2img, sdedit and inpaint then take --control-image)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build", help="compile an engine directory's ONNX graphs: TensorRT plans or AOTInductor "
                                     "packages, cached beside them")
    p.add_argument("--engines", required=True, help="engine directory written by `ti2i export`")
    p.add_argument("--backend", required=True, choices=("tensorrt", "aoti"),
                   help="TensorRT plans (GPU) or AOTInductor packages (CPU or CUDA)")
    p.add_argument("--components", default=None, help="comma-separated components (default: every ONNX one)")
    p.add_argument("--limit", default=None, help="cap declared dims for the build, e.g. batch=4,height=128 "
                                                 "(a plan's memory grows with its profile's max)")
    p.add_argument("--device", default=None, help="aoti: cpu or cuda (default: cuda when torch sees a GPU)")
    p.set_defaults(func=cmd_build)

    for name, func, help_text in (("repository", cmd_repository, "generate the Triton model repository"),
                                  ("serve", cmd_serve, "serve engine directories with Triton (the tritonserver on PATH, else the bundled one)")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--engines", required=True, action="append",
                       help="engine directory; NAME=DIR, repeated, serves several model families side by side "
                            "(their models named NAME.MODEL)")
        if name == "repository":
            p.add_argument("--out", required=True, help="the model repository folder to write")
            p.add_argument("--backend", choices=("python", "tensorrt", "onnxruntime", "aoti"), default="python",
                           help="python: python-backend models hosting the engines (CPU or GPU); tensorrt: "
                                "tensorrt_plan models (plans from `ti2i build`); onnxruntime: onnxruntime_onnx "
                                "models on the CUDA provider; both native ones on GPU instances; aoti: torch_aoti "
                                "models (pytorch backend, Triton 26.03+) of the packages `ti2i build --backend aoti` "
                                "wrote, on their build's device")
        else:
            p.add_argument("--repository", default=None, help="where to write the repository "
                                                              "(default: ENGINES/model_repository)")
            p.add_argument("--host", default="127.0.0.1",
                           help="address the published ports bind to, e.g. 0.0.0.0 in a container (Triton's own "
                                "HTTP port stays on loopback behind the guard; default %(default)s)")
            p.add_argument("--grpc-port", type=int, default=8001, help="published gRPC port")
            p.add_argument("--http-port", type=int, default=8000, help="published HTTP port (through the guard)")
            p.add_argument("--metrics-port", type=int, default=8002, help="published Prometheus metrics port")
            p.add_argument("--log", type=Path, default=None, help="server log file")
            p.add_argument("--api-key", default=None,
                           help="key of the restricted APIs, sent as header ti2i-api-key "
                                "(default: $TI2I_API_KEY, else a random one, printed at start)")
            p.add_argument("--openai-api-key", default=None,
                           help="bearer key the OpenAI-compatible API (/v1 on the HTTP port) asks of every request "
                                "(default: $TI2I_OPENAI_API_KEY, else none: open, as inference is)")
            p.add_argument("--open-apis", default=None,
                           help="comma-separated API groups to open to every client (restricted by default: "
                                "shared-memory, model-repository, logging, trace, statistics)")
            p.add_argument("--http-max-body-mb", type=float, default=64.0,
                           help="largest HTTP request body accepted (MiB; larger ones get 413)")
            p.add_argument("--no-supervise", action="store_true",
                           help="do not reload models whose python-backend stub died, nor restart a dead server")
        p.add_argument("--methods", default=None,
                       help=f"comma-separated methods to serve ({', '.join(METHODS)}); "
                            f"default: every method the engine directories serve")
        p.add_argument("--active", type=int, default=CoreOptions.active,
                       help="method requests each family's engine core runs at once; their steps batch together "
                            "(default %(default)s)")
        p.add_argument("--max-queue-size", type=int, default=CoreOptions.max_queue,
                       help="requests that may wait for one of those places; one more is refused with UNAVAILABLE "
                            "(default %(default)s)")
        p.add_argument("--queue-timeout-s", type=float, default=CoreOptions.queue_timeout_s,
                       help="a request that waited this long without starting is refused (default %(default)s; a "
                            "request's own shorter timeout wins)")
        p.add_argument("--threads", type=int, default=CoreOptions.threads,
                       help="intra-op threads of the engines (default 0: every core)")
        p.add_argument("--max-steps", type=int, default=WorkLimits.max_steps,
                       help="most denoising steps one request may ask for (default %(default)s)")
        p.add_argument("--max-pixels", type=int, default=WorkLimits.max_pixels,
                       help="most output pixels (frames × height × width) one request may ask for "
                            "(default %(default)s)")
        p.add_argument("--memory-budget", default=None,
                       help="memory the engines may use together, e.g. 8G (default: TI2I_MEMORY_BUDGET, else "
                            "60%% of the memory available); requests that would exceed an engine's share are refused")
        p.add_argument("--backend" if name == "serve" else "--engine-backend", dest="engine_backend",
                       choices=tuple(ENGINE_BACKENDS),
                       default=CoreOptions.backend,
                       help="the engines every method and component runs on: ort (ONNX Runtime), openvino (the "
                            "same graphs compiled for this CPU), aoti or tensorrt (the packages and plans `ti2i "
                            "build` wrote; components without one run on ort; default %(default)s)")
        p.add_argument("--precision", choices=PRECISIONS, default=CoreOptions.precision,
                       help="openvino: auto (bf16 where the CPU has AMX or AVX-512-BF16, else fp32), fp32 or bf16 "
                            "(default %(default)s)")
        p.add_argument("--device", default=CoreOptions.device, help="the engines' device (default %(default)s)")
        p.add_argument("--no-method-models", action="store_true",
                       help="only the components and ensembles (clients run the loops)")
        p.add_argument("--lora", action="append", default=None, metavar="NAME=PATH",
                       help="register a LoRA adapter (diffusers' format, or kohya's) that method requests may name in "
                            "their `lora` input (NAME or NAME:SCALE); repeat for several")
        if name == "repository":
            p.add_argument("--instances", type=int, default=1,
                           help="native backends: instances per component model (default %(default)s)")
            p.add_argument("--max-queue-delay-us", type=int, default=0,
                           help="native backends: how long a request may wait for others to batch with "
                                "(default 0: batch what queued)")
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
    for command in sub.choices.values():
        command.formatter_class = _HelpFormatter
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
