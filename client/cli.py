"""The `ti2i` command line: build, export, serve and run the methods.

Every error a user can fix is a `Ti2iError`: it is printed as one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ti2i.errors import InvalidInputError, Ti2iError

EXIT_USAGE = 2


def _runner(args: argparse.Namespace):
    from ti2i.client.runners import InProcessRunner, TritonRunner

    from ti2i.families import parse_engine_dirs

    if args.engines:
        return InProcessRunner(parse_engine_dirs(args.engines), family=args.family)
    return TritonRunner(args.server, family=args.family)


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--engines", action="append", help="engine directory written by `ti2i export` (runs "
                        "in-process); NAME=DIR, repeated, for several model families")
    target.add_argument("--server", help="Triton server URL: grpc://HOST:PORT or http://HOST:PORT; several "
                        "replicas separated by commas")
    parser.add_argument("--family", default=None, help="the model family to use when several serve the method")


def _add_image_args(parser: argparse.ArgumentParser,
                    out_help: str = "output image file (.png, .jpg, ...)", image: bool = True, seed: bool = True,
                    size_default: str = "the input image's") -> None:
    if image:
        parser.add_argument("--image", required=True, help="input image file")
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None,
                        help=f"output height (snapped to a multiple of 8; default: {size_default})")
    parser.add_argument("--width", type=int, default=None,
                        help=f"output width (snapped to a multiple of 8; default: {size_default})")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no timing report")


def check_out_parent(out: Path) -> Path:
    """Refuse an output path under an existing non-folder at once, not after the whole run."""
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InvalidInputError(f"output {out}: {parent} exists and is not a folder")
            break
    return out


def _check_image_out(path: str) -> Path:
    from PIL import Image

    out = check_out_parent(Path(path))
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise InvalidInputError(f"output {out} has no image extension PIL can write (use .png, .jpg, ...)")
    return out


def _save(result, out: Path, quiet: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    if not quiet:
        print(result.timings.report())
    print(f"wrote {out}")


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
    from ti2i.triton_models.repository import RepositoryOptions

    from ti2i.budget import parse_bytes

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
    return write_family_repository(manifests, out or first / "model_repository", _repository_options(args), models)


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
        print(f"wrote {write_native_repository(manifest, args.out, args.backend, _repository_options(args), models=_models(args, manifest))}")
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


def cmd_sdedit(args: argparse.Namespace) -> int:
    from ti2i.client.sdedit import sdedit

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = sdedit(runner, args.image, args.prompt, negative_prompt=args.negative_prompt,
                        strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
                        height=args.height, width=args.width, progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def cmd_pix2pix(args: argparse.Namespace) -> int:
    from ti2i.client.pix2pix import pix2pix

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = pix2pix(runner, args.image, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                         guidance=args.guidance, image_guidance=args.image_guidance, seed=args.seed,
                         height=args.height, width=args.width, progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def cmd_cyclediffusion(args: argparse.Namespace) -> int:
    from ti2i.client.cyclediffusion import cyclediffusion

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = cyclediffusion(runner, args.image, args.prompt, args.source_prompt, strength=args.strength,
                                steps=args.steps, guidance=args.guidance, source_guidance=args.source_guidance,
                                eta=args.eta, seed=args.seed, height=args.height, width=args.width,
                                progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    from ti2i.client.txt2img import txt2img

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = txt2img(runner, args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                         guidance=args.guidance, seed=args.seed, height=args.height, width=args.width,
                         progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def cmd_inpaint(args: argparse.Namespace) -> int:
    from ti2i.client.inpaint import inpaint

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = inpaint(runner, args.image, args.mask, args.prompt, negative_prompt=args.negative_prompt,
                         strength=args.strength, steps=args.steps, guidance=args.guidance, seed=args.seed,
                         height=args.height, width=args.width, progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def cmd_ddib(args: argparse.Namespace) -> int:
    from ti2i.client.ddib import ddib

    out = _check_image_out(args.out)
    with _runner(args) as runner:
        result = ddib(runner, args.image, args.prompt, args.source_prompt, strength=args.strength, steps=args.steps,
                      guidance=args.guidance, source_guidance=args.source_guidance, height=args.height,
                      width=args.width, progress=not args.quiet)
    _save(result, out, args.quiet)
    return 0


def _save_video(result, out: Path, quiet: bool) -> None:
    from ti2i.client.video import write_video

    write_video(result.frames, out, result.fps)
    if not quiet:
        print(result.timings.report())
    print(f"wrote {out} ({len(result.frames)} frames at {result.fps} fps)")


def cmd_svd(args: argparse.Namespace) -> int:
    from ti2i.client.svd import svd
    from ti2i.client.video import check_video_out

    out = check_out_parent(check_video_out(args.out))
    with _runner(args) as runner:
        result = svd(runner, args.image, frames=args.frames, steps=args.steps, fps=args.fps,
                     motion_bucket_id=args.motion_bucket_id, noise_aug=args.noise_aug, min_guidance=args.min_guidance,
                     max_guidance=args.max_guidance, decode_chunk_size=args.decode_chunk_size, seed=args.seed,
                     height=args.height, width=args.width, progress=not args.quiet)
    _save_video(result, out, args.quiet)
    return 0


def cmd_videoldm(args: argparse.Namespace) -> int:
    from ti2i.client.video import check_video_out
    from ti2i.client.videoldm import videoldm

    out = check_out_parent(check_video_out(args.out))
    with _runner(args) as runner:
        result = videoldm(runner, args.image, args.prompt, negative_prompt=args.negative_prompt, frames=args.frames,
                          strength=args.strength, steps=args.steps, guidance=args.guidance, alpha=args.alpha,
                          anchor_first_frame=args.anchor_first_frame, scheduler=args.scheduler, fps=args.fps,
                          seed=args.seed, height=args.height, width=args.width, progress=not args.quiet)
    _save_video(result, out, args.quiet)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ti2i.client.demo import run_demo

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
            p.add_argument("--backend", choices=("python", "tensorrt", "onnxruntime"), default="python",
                           help="python: python-backend models hosting the engines (CPU or GPU); tensorrt: "
                                "tensorrt_plan models (plans from `ti2i build`); onnxruntime: onnxruntime_onnx "
                                "models on the CUDA provider; both native ones on GPU instances")
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
                       help="comma-separated methods to serve (txt2img, sdedit, inpaint, cyclediffusion, ddib, "
                            "pix2pix, videoldm, svd); default: every model of the engine directory")
        p.add_argument("--max-queue-delay-us", type=int, default=0,
                       help="how long a request may wait for others to batch with (default 0: batch what queued)")
        p.add_argument("--max-queue-size", type=int, default=32,
                       help="requests that may wait per model; one more is refused with UNAVAILABLE (default 32)")
        p.add_argument("--queue-timeout-s", type=float, default=30.0,
                       help="a request that waited this long without starting is refused (default 30; a request's "
                            "own shorter timeout wins)")
        p.add_argument("--memory-budget", default=None,
                       help="memory all model instances may use together, e.g. 8G (default: TI2I_MEMORY_BUDGET, else "
                            "60%% of the memory available); requests that would exceed an instance's share are refused")
        p.add_argument("--instances", type=int, default=1)
        p.add_argument("--threads", type=int, default=0)
        p.set_defaults(func=func)

    p = sub.add_parser("sdedit", help="SDEdit image-to-image")
    _add_image_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    _add_target(p)
    p.set_defaults(func=cmd_sdedit)

    p = sub.add_parser("pix2pix", help="InstructPix2Pix editing by instruction")
    _add_image_args(p)
    p.add_argument("--prompt", required=True, help="the edit instruction (may be empty)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--guidance", type=float, default=7.5, help="text guidance s_T")
    p.add_argument("--image-guidance", type=float, default=1.5, help="image guidance s_I")
    _add_target(p)
    p.set_defaults(func=cmd_pix2pix)

    p = sub.add_parser("cyclediffusion", help="CycleDiffusion editing from a source to a target prompt")
    _add_image_args(p)
    p.add_argument("--source-prompt", required=True, help="describes the input image")
    p.add_argument("--prompt", required=True, help="describes the edited image")
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--source-guidance", type=float, default=1.0)
    p.add_argument("--eta", type=float, default=0.1, help="DDIM eta, > 0")
    _add_target(p)
    p.set_defaults(func=cmd_cyclediffusion)

    p = sub.add_parser("txt2img", help="text-to-image")
    _add_image_args(p, image=False, size_default="the model's, 512 for SD 1.5")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    _add_target(p)
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("inpaint", help="inpainting with a 9-channel inpainting UNet (mask white = repaint)")
    _add_image_args(p, size_default="the model's, 512 for SD 1.5; image and mask are resized to it")
    p.add_argument("--mask", required=True, help="mask image file: white repaints, black keeps")
    p.add_argument("--prompt", default="", help="what to paint into the masked region")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--strength", type=float, default=1.0, help="1 starts from pure noise")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    _add_target(p)
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser("ddib", help="DDIB: deterministic DDIM inversion under the source prompt, decoding under "
                                    "the target prompt")
    _add_image_args(p, seed=False)
    p.add_argument("--source-prompt", required=True, help="describes the input image")
    p.add_argument("--prompt", required=True, help="describes the edited image")
    p.add_argument("--strength", type=float, default=1.0, help="how far up to invert (1: all the way)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0, help="guidance of the decoding (target prompt)")
    p.add_argument("--source-guidance", type=float, default=1.0, help="guidance of the inversion (source prompt)")
    _add_target(p)
    p.set_defaults(func=cmd_ddib)

    p = sub.add_parser("svd", help="Stable Video Diffusion image-to-video")
    _add_image_args(p, out_help="output video: OUT.mp4 (H.264), OUT.gif, or a folder for PNG frames",
                    size_default="576×1024, the reference's")
    p.add_argument("--frames", type=int, default=None, help="frame count (default: the model's, 14 or 25)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--fps", type=int, default=7)
    p.add_argument("--motion-bucket-id", type=int, default=127)
    p.add_argument("--noise-aug", type=float, default=0.02)
    p.add_argument("--min-guidance", type=float, default=1.0)
    p.add_argument("--max-guidance", type=float, default=3.0)
    p.add_argument("--decode-chunk-size", type=int, default=None, help="frames decoded at once (default: all)")
    _add_target(p)
    p.set_defaults(func=cmd_svd)

    p = sub.add_parser("videoldm", help="Video LDM image-to-video (SD 1.x + motion modules, merged with alpha)")
    _add_image_args(p, out_help="output video: OUT.mp4 (H.264), OUT.gif, or a folder for PNG frames")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--strength", type=float, default=0.8)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--alpha", type=float, default=0.0,
                   help="temporal merge: 1 = the image model per frame, 0 = the motion modules as trained")
    p.add_argument("--anchor-first-frame", action=argparse.BooleanOptionalAction, default=True,
                   help="keep frame 0 on the input image's trajectory (default: on)")
    p.add_argument("--scheduler", choices=("model", "linear-ddim"), default="model",
                   help="the model folder's scheduler, or the linear-beta DDIM the motion modules were trained with")
    p.add_argument("--fps", type=float, default=8.0)
    _add_target(p)
    p.set_defaults(func=cmd_videoldm)

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
