"""Shared measuring habits: CUDA-event timing after warm-up, medians, peak memory, a table and JSON.

Every script runs in a small `--smoke` mode on the CPU (for CI) and a full mode on a GPU; figures
are only quoted from full GPU runs. Timing on CUDA uses events around the region after warm-up and
reports the median and the spread of many repeats; on the CPU, perf_counter medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument(
        "--only",
        default="",
        help="run only the cases whose label contains this (where cases exist)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the JSON"
    )
    args = parser.parse_args()
    args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    return args


def machine() -> dict:
    info = {
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    return info


def time_call(fn: Callable[[], object], device: str, warmup: int = 3, repeats: int = 10) -> dict:
    """Median and spread (min, max) of `fn`'s wall time in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1000)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples)}


def interleaved(calls: list[Callable[[], object]], device: str, repeats: int) -> list[list[float]]:
    """Wall times (ms) of each call over `repeats` rounds, every call once a round, in the
    reverse order every other round: a clock that drifts (a GPU still clocking up, a neighbour's
    load) weighs on the calls compared alike instead of on whichever ran first."""
    samples: list[list[float]] = [[] for _ in calls]
    for round_ in range(repeats):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            samples[i].append(time_call(calls[i], device, warmup=0, repeats=1)["median_ms"])
    return samples


def peak_memory(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated on the GPU while `fn` runs (None on the CPU)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def profiled(
    fn: Callable[[], object], device: str, calls: int = 5
) -> list[tuple[str, float, float]]:
    """`(kernel name, ms per call, launches per call)` of every GPU kernel `fn` runs (CPU ops on
    the CPU), from `torch.profiler` over `calls` calls after three warm-up calls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    found = []
    for e in prof.key_averages():
        total = e.self_device_time_total if cuda else e.self_cpu_time_total
        if total > 0:
            found.append((e.key, total / calls / 1000, e.count / calls))
    return found


def report(name: str, args: argparse.Namespace, rows: list[dict], summary: dict) -> None:
    """Print a plain table (the last thing a remote run shows) and write the JSON."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(_fmt(row.get(c))) for row in rows)) for c in columns}
    print(f"\n{name} ({'smoke, ' if args.smoke else ''}{machine()['device']})")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))
    for key, value in summary.items():
        print(f"{key}: {_fmt(value)}")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "smoke": args.smoke,
        "machine": machine(),
        "rows": rows,
        "summary": summary,
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "" if value is None else str(value)
