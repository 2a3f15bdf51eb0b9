"""The method subcommands of `ti2i`, generated from the method records (ti2i.client.registry).

Each record gives one subcommand: its image inputs (``--image``, ``--mask``), one flag per parameter
(``--negative-prompt`` for ``negative_prompt``), ``--out``, ``--quiet`` and the target: ``--engines``
(in-process) or ``--server`` (the client runs the loop, each model call a request), with
``--remote`` one request to the served method model, its streamed progress as the progress bar.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ti2i.client.registry import Method, Param
from ti2i.engines.loader import ENGINE_BACKENDS, describe_choice, engine_choice
from ti2i.engines.openvino import PRECISIONS
from ti2i.errors import InvalidInputError


def add_method_parser(sub: argparse._SubParsersAction, method: Method) -> None:
    p = sub.add_parser(method.name, help=method.help)
    for name in method.images:
        p.add_argument(f"--{name}", required=True, help=method.image_help.get(name, "input image file"))
    for name in method.optional_images:
        p.add_argument("--" + name.replace("_", "-"), help=method.image_help.get(name, "input image file"))
    for param in method.params:
        _add_param(p, param)
    p.add_argument("--out", required=True,
                   help=method.out_help or "output image file (.png, .jpg, ...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no timing report")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--engines", action="append", help="engine directory written by `ti2i export` (runs "
                        "in-process); NAME=DIR, repeated, for several model families")
    target.add_argument("--server", help="Triton server URL: grpc://HOST:PORT or http://HOST:PORT; several "
                        "replicas separated by commas")
    p.add_argument("--backend", choices=tuple(ENGINE_BACKENDS), default="ort",
                   help="with --engines: the engines to run on: ort (ONNX Runtime, the exact default), openvino "
                        "(the same graphs compiled for this CPU), aoti or tensorrt (`ti2i build`'s outputs)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="with --backend openvino: auto (bf16 where the CPU has AMX or AVX-512-BF16, else fp32), "
                        "fp32 or bf16")
    p.add_argument("--family", default=None, help="the model family to use when several serve the method")
    p.add_argument("--remote", action="store_true",
                   help=f"with --server: one request to the served `{method.name}` model (the loop runs in the "
                        f"server; over gRPC its progress is streamed)")
    p.set_defaults(func=lambda args: run_method_command(method, args))


def _add_param(p: argparse.ArgumentParser, param: Param) -> None:
    help_text = param.help + (f" {param.range_text()}" if param.range_text() and not param.choices else "")
    if param.kind is bool:
        p.add_argument(param.flag, action=argparse.BooleanOptionalAction, default=param.default, help=help_text)
    elif param.choices:
        p.add_argument(param.flag, choices=param.choices, default=param.default, help=help_text)
    elif param.many:
        p.add_argument(param.flag, action="append", default=None, metavar=param.name.upper(), help=help_text)
    else:
        p.add_argument(param.flag, type=param.kind, required=param.required,
                       default=None if param.sdxl_default is not None else param.default,
                       help=help_text or None)


def check_out_parent(out: Path) -> Path:
    """Refuse an output path under an existing non-folder at once, not after the whole run."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"output {out}: {parent} exists and is not a folder")
            break
    return out


def check_image_out(path: str) -> Path:
    from PIL import Image

    out = check_out_parent(Path(path))
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InvalidInputError(f"output {out} has no image extension PIL can write (use .png, .jpg, ...)")
    return out


def _runner(args: argparse.Namespace):
    from ti2i.client.runners import InProcessRunner, TritonRunner
    from ti2i.families import parse_engine_dirs

    if args.engines:
        choice = engine_choice(args.backend, args.precision)
        if args.backend != "ort" and not args.quiet:  # the exact default says nothing; the others, what runs
            print(f"engines: {describe_choice(choice)}")
        return InProcessRunner(parse_engine_dirs(args.engines), family=args.family, **choice)
    return TritonRunner(args.server, family=args.family)


def run_method_command(method: Method, args: argparse.Namespace) -> int:
    from ti2i.client.video import check_video_out

    out = check_image_out(args.out) if method.output == "image" else check_out_parent(check_video_out(args.out))
    inputs: dict[str, Any] = {name: getattr(args, name) for name in method.all_images}
    params = {p.name: getattr(args, p.name) for p in method.params}
    if args.server and (args.backend, args.precision) != ("ort", "auto"):
        raise InvalidInputError("--backend and --precision choose in-process engines (--engines); a server runs "
                                "the engines `ti2i serve --backend` chose")
    if args.remote:
        if not args.server:
            raise InvalidInputError("--remote needs --server (the method runs in the server)")
        from ti2i.client.remote import run_remote

        result = run_remote(args.server, method, progress=not args.quiet, family=args.family, **inputs, **params)
    else:
        with _runner(args) as runner:
            result = method(runner, progress=not args.quiet, **inputs, **params)
    _save(method, result, out, args.quiet)
    return 0


def _save(method: Method, result: Any, out: Path, quiet: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    if method.output == "video":
        from ti2i.client.video import write_video

        write_video(result.frames, out, result.fps)
    else:
        result.image.save(out)
    if not quiet:
        print(result.timings.report())
    if method.output == "video":
        print(f"wrote {out} ({len(result.frames)} frames at {result.fps} fps)")
    else:
        print(f"wrote {out}")
