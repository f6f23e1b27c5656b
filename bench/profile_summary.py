"""Where a training step's time goes: a torch profiler Chrome trace (``--profile``) summed by
kernel and by kind of kernel.

    python bench/profile_summary.py TRACE.json --steps 2 [--top 25] [--json OUT.json]
    python bench/profile_summary.py --step-times A.jsonl B.jsonl ... --window 2 4

The second form compares runs' steady step times: the median over consecutive logged steps
whose window lies in [first, last] of each ``--metrics-file``, as ratios to the first run.

On CUDA the trace's GPU kernels (and memory copies and sets) are summed by name: the share of
each kind (matrix products, attention, elementwise, reductions, ...), the busiest kernels,
and the GPU's busy time per step against the wall-clock span of the profiled steps (the gap
is the GPU waiting for the host). On a CPU-only run, which records no kernels, the ``aten::``
operators that no other ``aten::`` operator encloses are summed instead (their inclusive
time), so the table still adds up to the steps' host time.

The trainer marks its step's parts in the trace (``tst: read data``, ``tst: forward-backward``,
``tst: loss and checks``, ``tst: optimizer``; the rest is its work between steps): their host
time per step, and on CUDA how long the GPU sat idle in each and which host operators ran
meanwhile, so a phase whose steps take longer than its kernels shows where the host spends it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import statistics
import sys
from collections import defaultdict

# The first pattern that matches a kernel's (lower-cased) name names its kind.
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|wgmma|matmul|\bmm\b|aten::(mm|bmm|addmm|linear)"),
    ("cross-entropy", r"log_softmax|nll|cross_entropy|logsumexp"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("normalization", r"norm"),
    ("communication", r"nccl|gloo|all_reduce|allreduce|reduce_scatter|all_gather"),
    ("memory", r"memcpy|memset|copy_|\bcopy\b|cat|index|gather|scatter|embedding"),
    ("compiled (triton)", r"triton"),
    ("reduction", r"reduce|sum|mean|max|min"),
    ("elementwise", r"elementwise|vectorized|unrolled|aten::(add|mul|div|sub|silu|exp|where)"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def device_events(events: list[dict]) -> tuple[list[dict], str]:
    """The trace's GPU kernels and memory operations, else its outermost ``aten::`` ops."""
    gpu = [
        e
        for e in events
        if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    if gpu:
        return gpu, "cuda"
    return outermost_aten_ops(events), "cpu"


def outermost_aten_ops(events: list[dict]) -> list[dict]:
    """The host's ``aten::`` operators that no other one encloses on the same thread."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"
                  and e.get("name", "").startswith("aten::")),
                 key=lambda e: (e.get("tid"), e["ts"], -e["dur"]))  # fmt: skip
    outer, end = [], {}
    for e in ops:  # an op starting before the enclosing one on its thread ends is nested
        if e["ts"] >= end.get(e.get("tid"), float("-inf")):
            outer.append(e)
            end[e.get("tid")] = e["ts"] + e["dur"]
    return outer


def summarise(path: str, steps: int, top: int = 25) -> dict:
    with open(path) as f:
        trace = json.load(f)
    trace_events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    events, device = device_events(trace_events)
    if not events:
        raise ValueError(f"{path}: no GPU kernels and no aten:: operators in this trace: was it "
                         "written by --profile over at least one step?")  # fmt: skip
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        name = e["name"]
        by_name[name][0] += e["dur"]
        by_name[name][1] += 1
        by_kind[kind_of(name)] += e["dur"]
    busy = sum(by_kind.values())
    span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
    names = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    # The host's side on CUDA: CUDA runtime calls by name (synchronisations, copies,
    # launches), where a step that leaves the GPU idle spends its time.
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if device == "cuda":
        for e in trace_events:
            if e.get("ph") == "X" and e.get("cat") == "cuda_runtime":
                host[e["name"]][0] += e["dur"]
                host[e["name"]][1] += 1
    runtime = sorted(host.items(), key=lambda kv: -kv[1][0])[:8]
    regions = region_times(trace_events, events if device == "cuda" else [], steps)
    return {
        "trace": path, "device": device, "steps": steps,
        "busy_ms_per_step": busy / 1e3 / steps, "span_ms_per_step": span / 1e3 / steps,
        "kinds": {k: {"ms_per_step": v / 1e3 / steps, "share": v / busy}
                  for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n, "kind": kind_of(n), "ms_per_step": d / 1e3 / steps,
                 "calls_per_step": c / steps, "share": d / busy} for n, (d, c) in names],
        "cuda_runtime": [{"name": n, "ms_per_step": d / 1e3 / steps, "calls_per_step": c / steps}
                         for n, (d, c) in runtime],
        **regions,
    }  # fmt: skip


REGION_PREFIX = "tst: "  # the trainer's --profile ranges (tst.trainer.profiled_region)
OUTSIDE = "(outside the trainer's ranges: logging, evaluation, saves)"


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _overlap(start: float, end: float, intervals: list[tuple[float, float]], starts) -> float:
    """Length of [start, end) inside the disjoint sorted ``intervals``."""
    total, i = 0.0, max(bisect.bisect_right(starts, start) - 1, 0)
    while i < len(intervals) and intervals[i][0] < end:
        total += max(0.0, min(end, intervals[i][1]) - max(start, intervals[i][0]))
        i += 1
    return total


def region_times(trace_events: list[dict], gpu: list[dict], steps: int) -> dict:
    """The step's host time by the trainer's ``tst: ...`` ranges, and on CUDA the GPU's idle
    time by the range, and by the outermost ``aten::`` operator, the host was in meanwhile.

    The window runs from the first range's start to the trace's end (the profiled steps, each
    with the work after it); what lies in it outside every range is that work. Empty when the
    trace has no such ranges (a trace from an older trainer).
    """
    ranges = [(e["ts"], e["ts"] + e["dur"], e["name"][len(REGION_PREFIX):])
              for e in trace_events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and e.get("name", "").startswith(REGION_PREFIX)]  # fmt: skip
    if not ranges:
        return {}
    # The trainer records each profiled step whole, its work after the step included: the
    # window ends with the trace's last event.
    lo = min(r[0] for r in ranges)
    hi = max(e["ts"] + e["dur"] for e in trace_events if e.get("ph") == "X" and "dur" in e)
    if gpu:  # the GPU's idle intervals inside the window
        busy = _merged([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
        idle, at = [], lo
        for start, end in busy:
            if start > at:
                idle.append((at, min(start, hi)))
            at = max(at, end)
            if at >= hi:
                break
        if at < hi:
            idle.append((at, hi))
        idle = [(a, b) for a, b in idle if b > a]
    else:
        idle = []
    idle_starts = [i[0] for i in idle]
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # name: [host, GPU idle]
    for start, end, name in ranges:
        host[name][0] += end - start
        host[name][1] += _overlap(start, end, idle, idle_starts)
    covered = _merged([(a, b) for a, b, _ in ranges])
    host[OUTSIDE] = [
        (hi - lo) - sum(b - a for a, b in covered),
        sum(b - a for a, b in idle) - sum(_overlap(a, b, idle, idle_starts) for a, b in covered),
    ]
    result = {
        "window_ms_per_step": (hi - lo) / 1e3 / steps,
        "regions": [{"name": n, "host_ms_per_step": h / 1e3 / steps,
                     "gpu_idle_ms_per_step": g / 1e3 / steps}
                    for n, (h, g) in sorted(host.items(), key=lambda kv: -kv[1][0])],
    }  # fmt: skip
    if gpu:
        ops: dict[str, float] = defaultdict(float)
        for e in outermost_aten_ops(trace_events):
            ops[e["name"]] += _overlap(e["ts"], e["ts"] + e["dur"], idle, idle_starts)
        result["gpu_idle_ms_per_step"] = sum(b - a for a, b in idle) / 1e3 / steps
        result["idle_ops"] = [{"name": n, "ms_per_step": d / 1e3 / steps}
                              for n, d in sorted(ops.items(), key=lambda kv: -kv[1])[:8] if d > 0]  # fmt: skip
    return result


def render(s: dict, label: str = "") -> str:
    what = "GPU kernels" if s["device"] == "cuda" else "outermost aten:: operators (CPU)"
    lines = [f"{label or s['trace']}: {what}, {s['busy_ms_per_step']:.1f} ms busy per step over a "
             f"{s['span_ms_per_step']:.1f} ms span ({s['busy_ms_per_step'] / max(s['span_ms_per_step'], 1e-9):.0%}"
             f" busy), {s['steps']} profiled steps", "",
             "| kind | ms per step | share |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v['ms_per_step']:.2f} | {v['share']:.1%} |" for k, v in s["kinds"].items()]
    lines += [
        "",
        "| kernel | kind | ms per step | calls per step | share |",
        "|---|---|---|---|---|",
    ]
    for t in s["top"]:
        name = t["name"] if len(t["name"]) <= 90 else t["name"][:87] + "..."
        lines.append(f"| `{name}` | {t['kind']} | {t['ms_per_step']:.2f} | "
                     f"{t['calls_per_step']:g} | {t['share']:.1%} |")  # fmt: skip
    if s.get("cuda_runtime"):
        lines += [
            "",
            "| CUDA runtime call (host) | ms per step | calls per step |",
            "|---|---|---|",
        ]
        lines += [f"| `{r['name']}` | {r['ms_per_step']:.2f} | {r['calls_per_step']:g} |"
                  for r in s["cuda_runtime"]]  # fmt: skip
    if s.get("regions"):
        gpu = "gpu_idle_ms_per_step" in s
        lines += ["", f"The trainer's ranges over a {s['window_ms_per_step']:.1f} ms window per step"
                  + (f"; the GPU idle {s['gpu_idle_ms_per_step']:.1f} ms of it:" if gpu else ":"),
                  "", "| range | host ms per step |" + (" GPU idle ms per step |" if gpu else ""),
                  "|---|---|" + ("---|" if gpu else "")]  # fmt: skip
        for r in s["regions"]:
            lines.append(f"| {r['name']} | {r['host_ms_per_step']:.2f} |"
                         + (f" {r['gpu_idle_ms_per_step']:.2f} |" if gpu else ""))  # fmt: skip
    if s.get("idle_ops"):
        lines += ["", "| host operator while the GPU is idle | ms per step |", "|---|---|"]
        lines += [f"| `{o['name']}` | {o['ms_per_step']:.2f} |" for o in s["idle_ops"]]
    return "\n".join(lines)


def steady_step_seconds(path: str, first: int, last: int) -> float:
    """Median seconds of the one-step logging windows (i - 1, i] with first < i <= last."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "positions_per_s" in r and "elapsed_s" in r]
    spans = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(train, train[1:], strict=False)
             if b["iteration"] - a["iteration"] == 1 and first <= a["iteration"]
             and b["iteration"] <= last]  # fmt: skip
    if not spans:
        raise ValueError(f"{path}: no one-step logging window within steps {first}..{last} "
                         "(log with --log-interval 1)")  # fmt: skip
    return statistics.median(spans)


def render_step_times(paths: list[str], first: int, last: int) -> str:
    times = {os.path.basename(p).removesuffix(".jsonl"): steady_step_seconds(p, first, last)
             for p in paths}  # fmt: skip
    base_name, base = next(iter(times.items()))
    lines = [f"| run | s per step (median, steps {first + 1}..{last}) | speed vs {base_name} |",
             "|---|---|---|"]  # fmt: skip
    lines += [f"| {name} | {t:.3f} | {base / t:.2f}x |" for name, t in times.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace", nargs="?", help="a Chrome trace written by pretrain_tst.py --profile")
    p.add_argument("--steps", type=int, help="profiled steps in the trace")
    p.add_argument("--step-times", nargs="+", metavar="METRICS",
                   help="instead: compare these runs' steady step times (--metrics-file JSONL)")  # fmt: skip
    p.add_argument("--window", type=int, nargs=2, default=(1, 10**9), metavar=("FIRST", "LAST"),
                   help="with --step-times: the steps' range (default all)")  # fmt: skip
    p.add_argument("--top", type=int, default=25, help="busiest kernels listed")
    p.add_argument("--label", default="", help="the table's title (default: the trace's path)")
    p.add_argument("--json", help="also write the summary here")
    args = p.parse_args(argv)
    if args.step_times:
        try:
            print(render_step_times(args.step_times, *args.window))
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0
    if not args.trace or args.steps is None or args.steps < 1:
        p.error("give a trace and --steps (at least 1), or --step-times")
    try:
        s = summarise(args.trace, args.steps, args.top)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(render(s, args.label))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(s, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
