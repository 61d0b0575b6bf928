"""Compile latency (issue 9, CPU): load + validate + check + plan + meta-device estimate.

(a) A generated 1,000-node federation (10 shapes, ~2,000 message edges in a DAG, feedback through
delayed edges): target <= 1 s. (b) A ~10-billion-parameter spec built on the meta device in a fresh
process: target <= 3 s and peak memory < 1 GB above the process's baseline after importing torch.
Times are medians of several runs after one warm-up (imports excluded, reported separately).
"""

from __future__ import annotations

import json
import random
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
    summary = {
        "federation_total_s": median["total"],
        "federation_target_s": 1.0,
        "ten_billion_parameters": big["parameters"],
        "ten_billion_s": big["seconds"],
        "ten_billion_peak_MiB_above_baseline": big["peak_delta_MiB"],
        "ten_billion_process_peak_rss_MiB": big["peak_MiB"],
        "targets_met": bool(
            median["total"] <= 1.0 and big["seconds"] <= 3.0 and big["peak_delta_MiB"] < 1024
        )
        if not args.smoke
        else None,
    }
    report("compile_latency", args, rows, summary)


if __name__ == "__main__":
    main()
