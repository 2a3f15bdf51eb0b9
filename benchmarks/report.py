"""The human views of a results document: a markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ti2i.benchmarks.machine import label

# Stages in pipeline order, the per-step UNet last but one.
STAGE_ORDER = ("encode_prompt", "encode_image_clip", "encode_image", "unet", "decode_image", "decode_chunk")


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:,.1f}"


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:,.3f}"


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _stages(entry: dict[str, Any]) -> list[str]:
    seen = {s for item in entry.get("summary", {}).values() for s in item.get("stages", {})}
    return [s for s in STAGE_ORDER if s in seen] + sorted(seen - set(STAGE_ORDER))


def markdown(data: dict[str, Any]) -> str:
    cfg = data.get("config", {})
    apart = any(entry.get("one_at_a_time") for entry in data.get("methods", {}).values())
    order = "one after the other where their weights did not fit in memory together" if apart else \
        "interleaved round-robin"
    lines = [
        f"# ti2i benchmark — preset `{cfg.get('preset')}`",
        "",
        f"Machine: {label(data.get('machine', {}))}. "
        f"Load average at start {data.get('machine', {}).get('load_average_at_start')}. "
        f"Commit {str((data.get('git') or {}).get('commit'))[:10]}"
        f"{' (with local changes)' if (data.get('git') or {}).get('dirty') else ''}; "
        f"onnxruntime {data.get('versions', {}).get('onnxruntime')}, torch {data.get('versions', {}).get('torch')}.",
        f"Repeats {cfg.get('repeats')} (after {cfg.get('warmup')} warm-up), backends {order}; "
        f"medians unless marked.{'' if data.get('complete') else ' **Partial results (run not complete).**'}",
        "",
    ]
    for method, entry in data.get("methods", {}).items():
        lines += _method_section(method, entry, data.get("machine", {}).get("usable_cores"))
    return "\n".join(lines) + "\n"


def _method_section(method: str, entry: dict[str, Any], cores: int | None = None) -> list[str]:
    req = entry.get("request", {})
    size = f"{req.get('width')}×{req.get('height')}"
    extra = f", {req.get('frames')} frames" if req.get("frames") else ""
    strength = f", strength {req.get('strength')}" if method in ("sdedit", "cyclediffusion") else ""
    lines = [f"## {method} — {size}, {req.get('steps')} steps{strength}{extra}, guidance {req.get('guidance')} "
             f"({entry.get('status')})", ""]
    if entry.get("error"):
        lines += [f"Error: `{entry['error']}`", ""]
    loads = [r["load_average"][0] for r in entry.get("rounds", []) if isinstance(r, dict) and r.get("load_average")]
    if loads:
        lines += [f"Load average (1 min) at the start of the {len(loads)} rounds: {min(loads):.2f}–{max(loads):.2f} "
                  f"(median {sorted(loads)[len(loads) // 2]:.2f}) on {cores} cores.", ""]
    summary = entry.get("summary", {})
    stages = _stages(entry)
    header = ["backend", "end to end s", "p90 s", "p99 s", "min s"] + [f"{s} ms" for s in stages] + \
             ["speed-up vs diffusers", "time vs ort"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ratios = entry.get("ratios", {})
    for name, record in entry.get("backends", {}).items():
        if name not in summary:
            reason = record.get("reason", record.get("status"))
            lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(header) - 2))
            continue
        item = summary[name]
        e2e = item["end_to_end_s"]
        cells = [name, _s(e2e.get("median")), _s(e2e.get("p90")), _s(e2e.get("p99")), _s(e2e.get("min"))]
        for stage in stages:
            st = item["stages"].get(stage)
            if st is None:
                cells.append("–")
            elif stage == "unet" or (st.get("calls_per_request") or 1) > 1:
                cells.append(f"{_ms(st['per_call_s'].get('median'))} ×{int(st['calls_per_request'] or 0)}")
            else:
                cells.append(_ms(st["per_request_s"].get("median")))
        r = ratios.get(name, {})
        cells += [_x(r.get("speedup_vs_diffusers")) if name != "diffusers" else "1.00×",
                  _x(r.get("time_vs_ort")) if name != "ort" else "1.00×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    pairing = ("The backends' weights did not fit in memory together, so each was measured on its own, one after "
               "the other: a ratio pairs the n-th request of each (not run back to back)" if entry.get("one_at_a_time")
               else "Ratios are the median over rounds of the per-round ratio (backends run back to back in each "
                    "round, so passing load cancels)")
    lines.append(f"Per-call stages show the median of one call × calls per request. {pairing}; the ratios of the "
                 f"medians are in results.json.")
    lines.append("")
    overhead = entry.get("serving_overhead_ms", {})
    if overhead:
        lines += ["Serving overhead per UNet call (served − in-process, ms): " + "; ".join(
            f"{name} {_fmt_ms(o.get('from_unet_calls'))} (single calls), {_fmt_ms(o.get('from_requests'))} "
            f"(steps in requests)" for name, o in overhead.items()), ""]
    for sweep in entry.get("concurrency_sweeps") or [entry.get("concurrency")]:
        if sweep and sweep.get("levels"):
            unet = entry.get("unet_calls", {}).get("model") or ("unet_svd" if method == "svd" else
                                                                "unet_pix2pix" if method == "pix2pix" else "unet")
            rounds = len(sweep.get("rounds") or [None])
            interleaved = (f", {rounds} rounds of the levels back to back: a level's gain is the median of its "
                           f"rounds' gains (their range in brackets)" if rounds > 1 else "")
            lines += [f"Concurrency sweep over `{sweep['backend']}` "
                      f"({sweep['requests_per_client']} requests per client{interleaved}):",
                      "",
                      f"| clients | requests/s | gain | latency p50 s | p90 s | p99 s | {unet} requests/execution | "
                      f"{unet} samples/execution | {unet} queue ms/request | {unet} compute ms/request | "
                      f"executed batch sizes | CPU ms/request | cores busy |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for level in sweep["levels"]:
                lat = level.get("latency_s", {})
                server = level.get("server", {}).get(unet, {})
                lines.append(
                    f"| {level['clients']} | {_num(level.get('throughput_rps'), 3)} | "
                    f"{_gain(level)} | "
                    f"{_s(lat.get('median'))} | {_s(lat.get('p90'))} | {_s(lat.get('p99'))} | "
                    f"{_num(server.get('avg_requests_per_execution'), 2)} | "
                    f"{_num(server.get('avg_batch_samples'), 2)} | {_num(server.get('queue_ms_per_request'), 2)} | "
                    f"{_num(server.get('compute_infer_ms_per_request'), 2)} | "
                    f"{server.get('executed_batch_sizes') or '–'} | {_num(cpu_of(level).get('ms_per_request'), 1)} | "
                    f"{_num(cpu_of(level).get('cores_busy'), 2)} |")
            lines += _gain_factor_lines(sweep)
            if sweep.get("best_gain"):
                lines += ["", f"Best throughput gain from concurrency: {sweep['best_gain']:.2f}× "
                              f"at {sweep['best_clients']} clients."]
            lines.append("")
        elif sweep and sweep.get("skipped"):
            lines += [f"Concurrency sweep skipped: {sweep['skipped']}", ""]
    return lines


def _gain(level: dict[str, Any]) -> str:
    spread = level.get("throughput_gain_range")
    if (level.get("rounds") or 1) > 1 and spread:
        return f"{_x(level.get('throughput_gain'))} ({spread[0]:.2f}–{spread[1]:.2f})"
    return _x(level.get("throughput_gain"))


def cpu_of(level: dict[str, Any]) -> dict[str, Any]:
    return level.get("cpu") or {}


def _gain_factor_lines(sweep: dict[str, Any]) -> list[str]:
    """What each level's gain is made of (`benchmarks/cpu_time.py`), and its bound with every core busy."""
    parts = []
    for level in sweep["levels"][1:]:
        cpu = cpu_of(level)
        if "bound_all_cores" in cpu:
            parts.append(f"at {level['clients']} clients {cpu['busy_ratio']:.2f} (cores busy) × {cpu['cpu_ratio']:.2f} "
                         f"(CPU per request), at most {cpu['bound_all_cores']:.2f}× with all {sweep.get('cores')} "
                         f"cores busy")
    if not parts:
        return []
    return ["", "The gain over the first level, as the ratio of cores busy times the ratio of CPU per request (the "
                "server's processes and the benchmark's own, clients included): " + "; ".join(parts) + "."]


def _fmt_ms(stats: dict[str, Any] | None) -> str:
    if not stats or not stats.get("n"):
        return "–"
    return f"{stats['median']:.2f} (p90 {stats['p90']:.2f})"


def _num(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def plot(data: dict[str, Any], path: Path) -> bool:
    """Per method: stacked stage medians per backend (left) and throughput vs concurrency (right).

    Returns whether there was anything to plot (and the file was written).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [(m, e) for m, e in data.get("methods", {}).items() if e.get("summary")]
    if not methods:
        return False
    fig, axes = plt.subplots(len(methods), 2, figsize=(13, 4.2 * len(methods)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.6, 1]})
    colors = plt.get_cmap("tab10")
    for row, (method, entry) in enumerate(methods):
        ax = axes[row][0]
        summary = entry["summary"]
        names = list(summary)
        stages = _stages(entry)
        bottoms = [0.0] * len(names)
        for i, stage in enumerate(stages + ["other"]):
            heights = []
            for name in names:
                item = summary[name]
                if stage == "other":
                    value = item.get("outside_stages_s", {}).get("median") or 0.0
                else:
                    value = (item["stages"].get(stage, {}).get("per_request_s") or {}).get("median") or 0.0
                heights.append(max(value, 0.0))
            ax.barh(names, heights, left=bottoms, color=colors(i), label=stage)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for y, name in enumerate(names):
            e2e = summary[name]["end_to_end_s"].get("median")
            if e2e:
                ax.text(bottoms[y], y, f" {e2e:.3g} s", va="center", fontsize=8)
        ax.set_xlim(0, max(bottoms) * 1.35 if max(bottoms) > 0 else 1)  # room for the labels and the legend
        ax.invert_yaxis()
        ax.set_xlabel("seconds per request (median per stage)")
        ax.set_title(f"{method}: latency by backend and stage")
        ax.legend(fontsize=7, loc="lower right")
        ax2 = axes[row][1]
        levels = (entry.get("concurrency") or {}).get("levels") or []
        if levels:
            xs = [lv["clients"] for lv in levels]
            ax2.plot(xs, [lv.get("throughput_rps") or 0 for lv in levels], "o-", label="requests/s")
            ax2.set_xlabel("concurrent clients")
            ax2.set_ylabel("requests / s")
            ax2.set_ylim(bottom=0, top=max(lv.get("throughput_rps") or 0 for lv in levels) * 1.15 or 1)
            ax2.set_xticks(xs)
            ax3 = ax2.twinx()
            ax3.plot(xs, [lv.get("latency_s", {}).get("median") or 0 for lv in levels], "s--", color="tab:red",
                     label="latency p50")
            ax3.set_ylabel("latency p50 (s)", color="tab:red")
            ax3.set_ylim(bottom=0)
            ax2.legend(handles=ax2.get_lines() + ax3.get_lines(), fontsize=7, loc="lower right")
            ax2.set_title(f"{method}: throughput vs concurrency ({entry['concurrency']['backend']})")
        else:
            ax2.set_axis_off()
    fig.suptitle(f"ti2i bench, preset {data.get('config', {}).get('preset')} — {label(data.get('machine', {}))}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
