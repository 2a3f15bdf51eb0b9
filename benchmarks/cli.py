"""`ti2i bench`: the command-line face of the harness (registered by ti2i.app.cli)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ti2i.errors import InvalidInputError


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be ≥ 0, got {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ti2i.benchmarks.backends import BACKENDS, DEFAULT_BACKENDS
    from ti2i.benchmarks.presets import PRESETS
    from ti2i.client.registry import METHODS
    from ti2i.engines.loader import ENGINE_BACKENDS

    p = sub.add_parser("bench", help="latency/throughput benchmark of every backend side by side",
                       description="Measure our engines in-process and served by Triton against the diffusers "
                                   "reference, interleaved in one run; write results.json/.md/.png.")
    p.add_argument("--method", default="sdedit", help=f"{', '.join(METHODS)}, a comma list, or all")
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--model", default=None, help="a real diffusers model folder instead of the preset's models")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma-separated, from: {', '.join(BACKENDS)}")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8],
                   help="concurrent client counts for the sweep against the server (e.g. 1,2,4,8; 0 skips it)")
    p.add_argument("--concurrency-backend", default="triton-grpc",
                   help="backend(s) the sweep uses, comma-separated: one sweep each, on the same server (ort: "
                        "concurrent in-process loops, threads of one process)")
    p.add_argument("--concurrency-requests", type=int, default=None, help="whole requests per client per level")
    p.add_argument("--concurrency-rounds", type=int, default=1,
                   help="run the levels this many times, back to back in each round; a level's gain is the median "
                        "of its rounds' gains (default 1)")
    p.add_argument("--out", required=True, help="results folder (results.json, results.md, results.png)")
    p.add_argument("--repeats", type=int, default=None, help="measured requests per backend (default: preset's)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up requests per backend (at least 1 runs)")
    p.add_argument("--steps", type=int, default=None, help="inference steps (default: the preset's)")
    p.add_argument("--unet-calls", type=int, default=None, help="single UNet calls per backend for the overhead")
    p.add_argument("--max-queue-delay-us", type=int, default=None,
                   help="dynamic-batching delay of the served models (default: the repository's default)")
    p.add_argument("--max-queue-size", type=int, default=None,
                   help="queue bound of the served component models (0: unbounded, no queue policy; default 32)")
    p.add_argument("--engine-backend", default="ort", choices=tuple(ENGINE_BACKENDS),
                   help="the engines the served backends' core runs on (`ti2i serve --backend`; default %(default)s)")
    p.add_argument("--cache", default=None, help="where built models and engines are kept "
                                                 "(default: $TI2I_BENCH_CACHE or ~/.cache/ti2i/bench)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES",
                   help="instead: a soak of this many minutes against one supervised server (benchmarks/soak.py)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the soak or the adapter sweep")
    p.add_argument("--controlnet", action="store_true",
                   help="instead: what a ControlNet costs one denoising step (benchmarks/controlnet.py)")
    p.add_argument("--adapters", action="store_true",
                   help="instead: what per-request LoRA adapters cost (benchmarks/adapters.py): --clients SDEdit "
                        "clients each with its own adapter vs one shared adapter vs none, and one UNet call with an "
                        "adapter vs without")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from ti2i.benchmarks.harness import BenchConfig, run_benchmark

    if args.soak is not None:
        from ti2i.benchmarks.soak import run_soak

        report = run_soak(args.soak, args.clients, Path(args.out), preset=args.preset,
                          cache=Path(args.cache) if args.cache else None,
                          log=(lambda _: None) if args.quiet else print)
        print((Path(args.out) / "soak.md").read_text())
        return 0 if report["unexpected_failures"] == 0 else 1

    if args.adapters:
        from ti2i.benchmarks.adapters import run_adapter_bench

        run_adapter_bench(Path(args.out), preset=args.preset, clients=args.clients, rounds=args.concurrency_rounds,
                          requests=args.concurrency_requests or 2, cache=Path(args.cache) if args.cache else None,
                          log=(lambda _: None) if args.quiet else print)
        print((Path(args.out) / "adapters.md").read_text())
        return 0

    if args.controlnet:
        from ti2i.benchmarks.controlnet import run_controlnet_bench

        run_controlnet_bench(Path(args.out), preset=args.preset, rounds=args.concurrency_rounds,
                             calls=args.unet_calls or 10, cache=Path(args.cache) if args.cache else None,
                             log=(lambda _: None) if args.quiet else print)
        print((Path(args.out) / "controlnet.md").read_text())
        return 0

    if args.repeats is not None and args.repeats < 1:
        raise InvalidInputError(f"--repeats must be ≥ 1, got {args.repeats}")
    if args.concurrency_rounds < 1:
        raise InvalidInputError(f"--concurrency-rounds must be ≥ 1, got {args.concurrency_rounds}")
    config = BenchConfig(
        methods=args.method,
        preset=args.preset,
        backends=[b.strip() for b in args.backends.split(",") if b.strip()],
        concurrency=[c for c in args.concurrency if c > 0],
        concurrency_backend=args.concurrency_backend,
        concurrency_requests=args.concurrency_requests,
        concurrency_rounds=args.concurrency_rounds,
        out=Path(args.out),
        model=args.model,
        cache=Path(args.cache) if args.cache else None,
        repeats=args.repeats,
        warmup=args.warmup,
        steps=args.steps,
        unet_calls=args.unet_calls,
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        engine_backend=args.engine_backend,
        quiet=args.quiet,
        argv=["ti2i", *sys.argv[1:]],
    )
    data = run_benchmark(config)
    print((Path(args.out) / "results.md").read_text())
    return 0 if data.get("complete") else 1
