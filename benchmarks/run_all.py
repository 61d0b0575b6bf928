"""Run every benchmark in sequence (one device call runs the whole suite) and collect the JSON.

python benchmarks/run_all.py --smoke          # CPU, tiny sizes (CI)
python benchmarks/run_all.py --out DIR        # full sizes, on the GPU when there is one
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "compile_latency",
    "federation_batching",
    "feedback_memory",
    "overhead_vs_handwritten",
    "fractal_levels",
    "lattice_attention",
    "profile_steps",
    "composition",
    "train_throughput",
    "equilibrium_solvers",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", default=SCRIPTS, choices=SCRIPTS)
    args = parser.parse_args()
    failed = []
    for name in args.only:
        command = [sys.executable, str(HERE / f"{name}.py"), "--out", str(args.out)] + (
            ["--smoke"] if args.smoke else []
        )
        print(f"== {name}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(name)
    summary = {}
    for name in args.only:
        path = args.out / f"{name}.json"
        if path.exists():
            summary[name] = json.loads(path.read_text())["summary"]
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
