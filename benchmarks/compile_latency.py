"""Compile latency (issues 9 and 21, CPU): load + validate + check + plan + estimate.

(a) A generated 1,000-node federation (10 shapes, ~2,000 message edges in a DAG, feedback through
delayed edges): target <= 1 s. (b) A ~10-billion-parameter spec built on the meta device in a fresh
process: target <= 3 s and peak memory < 1 GB above the process's baseline after importing torch.
Times are medians of several runs after one warm-up (imports excluded, reported separately).
(c) `epicycle validate` of every gallery spec (specs/*.yaml) in a fresh process, imports included,
as a user types it: target <= 0.5 s each (median of several runs, wall time of the whole process).
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time

from common import ROOT, parse_args, report

import compiler
from compiler.ir import build_ir
from compiler.passes import CHECKS, TRANSFORMS_AFTER_CHECKS, TRANSFORMS_BEFORE_CHECKS


def federation_spec(nodes: int) -> str:
    rng = random.Random(0)
    lines = [
        "spec: 1",
        "name: thousand",
        "defaults: {transformer: {width: 32, heads: 2, layers: 1}}",
        "inputs: {tokens: {kind: tokens, vocab: 64, context: 64}}",
        "nodes:",
    ]
    lines += [f"  n{i}: {{kind: transformer, layers: {1 + i % 10}}}" for i in range(nodes)]
    lines.append("edges:")
    for i in range(1, nodes):
        for j in rng.sample(range(i), min(i, 2)):
            lines.append(f"  - {{from: n{j}, to: n{i}}}")
    lines += [f"  - {{from: n{nodes - 1 - k}, to: n{k}, delay: 1}}" for k in range(5)]
    lines += ["feedback: {steps: 2}", f"outputs: {{logits: {{from: n{nodes - 1}, kind: lm_head}}}}"]
    return "\n".join(lines) + "\n"


def phases(text: str) -> dict[str, float]:
    timings = {}
    t = time.perf_counter()
    loaded = compiler.load_spec_text(text, "thousand.yaml")
    timings["load+validate"] = time.perf_counter() - t
    t = time.perf_counter()
    ir = build_ir(loaded)
    for transform in TRANSFORMS_BEFORE_CHECKS:
        ir = transform(ir)
    for check in CHECKS:
        assert not [d for d in check(ir) if d.severity == "error"]
    timings["build+checks"] = time.perf_counter() - t
    for transform in TRANSFORMS_AFTER_CHECKS:
        t = time.perf_counter()
        ir = transform(ir)
        timings[transform.__name__] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    return timings


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, compiler
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
ir = compiler.analyze({path!r})
elapsed = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": elapsed, "parameters": ir.facts.parameters, "peak_delta_MiB": (peak - base) / 1024, "peak_MiB": peak / 1024}}))
"""


def validate_seconds(spec: str, runs: int) -> tuple[list[float], list[float]]:
    """Wall times of `epicycle validate SPEC` in fresh processes, with this checkout's code, and
    their CPU times (user + system), which a busy machine inflates less."""
    script = shutil.which("epicycle")
    command = [script] if script else [sys.executable, "-m", "compiler.tools.cli"]
    path = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]  # keep the caller's too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        done = subprocess.run([*command, "validate", spec], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"`epicycle validate {spec}` failed:\n{done.stderr[-2000:]}")
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return times, cpu


def validate_rows(runs: int, smoke: bool) -> list[dict]:
    specs = sorted((ROOT / "specs").glob("*.yaml"))
    rows = []
    for path in specs[:2] if smoke else specs:  # the smoke run only shows the row works
        times, cpu = validate_seconds(str(path), runs)
        rows.append(
            {
                "case": f"validate specs/{path.name} (fresh process)",
                "phase": "wall",
                "seconds": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "cpu_s": statistics.median(cpu),
            }
        )
    return rows


def main() -> None:
    args = parse_args(__doc__)
    nodes = 100 if args.smoke else 1000
    text = federation_spec(nodes)
    phases(text)  # warm-up: first use of torch, torch-geometric
    runs = [phases(text) for _ in range(2 if args.smoke else 5)]
    median = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in runs[0]}
    rows = [
        {"case": f"{nodes}-node federation", "phase": k, "seconds": v} for k, v in median.items()
    ]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD.format(
                root=str(ROOT), path=str(ROOT / "tests" / "fixtures" / "ten_billion.yaml")
            ),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    big = json.loads(child.stdout.strip().splitlines()[-1])
    rows.append(
        {"case": "10B-parameter spec (meta)", "phase": "analyze", "seconds": big["seconds"]}
    )
    validated = validate_rows(1 if args.smoke else 7, args.smoke)
    rows += validated
    slowest = max(r["seconds"] for r in validated)
    summary = {
        "validate_slowest_median_s": slowest,
        "validate_target_s": 0.5,
        "federation_total_s": median["total"],
        "federation_target_s": 1.0,
        "ten_billion_parameters": big["parameters"],
        "ten_billion_s": big["seconds"],
        "ten_billion_peak_MiB_above_baseline": big["peak_delta_MiB"],
        "ten_billion_process_peak_rss_MiB": big["peak_MiB"],
        "targets_met": bool(
            median["total"] <= 1.0
            and big["seconds"] <= 3.0
            and big["peak_delta_MiB"] < 1024
            and slowest <= 0.5
        )
        if not args.smoke
        else None,
    }
    report("compile_latency", args, rows, summary)


if __name__ == "__main__":
    main()
