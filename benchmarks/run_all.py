"""Run every benchmark in sequence (one device call runs the whole suite) and collect the JSON.

python benchmarks/run_all.py --smoke          # CPU, tiny sizes (CI), every script in this process
python benchmarks/run_all.py --out DIR        # full sizes, on the GPU when there is one

A full run gives each script a fresh process, so no script's figures carry another's compiled
code, allocator state or imports. A smoke run only shows that every script runs and writes its
JSON, so it runs them all in this one process: the torch and compiler imports, about as long as
a smoke run's work, are paid once, not once a script. Between scripts the compile caches are
cleared, so no script reaches another's recompile limit.
"""

from __future__ import annotations

import argparse
import json
import runpy
import subprocess
import sys
import time
import traceback
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
    "equilibrium_spectrum",
    "equilibrium_trained_map",
]


def arguments(name: str, out: Path, smoke: bool) -> list[str]:
    return [str(HERE / f"{name}.py"), "--out", str(out)] + (["--smoke"] if smoke else [])


def run_in_a_fresh_process(name: str, out: Path, smoke: bool) -> bool:
    return subprocess.run([sys.executable, *arguments(name, out, smoke)]).returncode == 0


def run_in_this_process(name: str, out: Path, smoke: bool) -> bool:
    """The script as `python benchmarks/NAME.py ...` runs it (`__main__`, its own argv); an
    exception or a non-zero exit fails this script only, with its traceback printed."""
    import torch

    argv = sys.argv
    sys.argv = arguments(name, out, smoke)
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stopped:
        return stopped.code in (None, 0)
    except Exception:
        traceback.print_exc()
        return False
    finally:
        sys.argv = argv
        sys.stdout.flush()
        torch._dynamo.reset()
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--only", nargs="*", default=SCRIPTS, choices=SCRIPTS)
    args = parser.parse_args()
    run = run_in_this_process if args.smoke else run_in_a_fresh_process
    failed = []
    for name in args.only:
        print(f"== {name}", flush=True)
        began = time.perf_counter()
        if not run(name, args.out, args.smoke):
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - began:.1f} s", flush=True)
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
