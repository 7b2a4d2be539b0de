"""Sandbox throughput on the canonical HumanEval single-line infilling solutions (all must pass).

Usage: python benchmarks/bench_sandbox.py [--workers N] [--limit N]

Prints sandboxed executions per second and the per-execution cost relative to a bare
``python -c pass`` (and ``python -I -S -c pass``) launched through the same thread pool.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.scoring.sandbox import (  # noqa: E402
    filesystem_isolation_available,
    network_isolation_available,
    run_many,
)

DATA = "humaneval_infilling/HumanEval-SingleLineInfilling.jsonl.gz"


def load_programs(limit: int | None) -> tuple[list[str], list[str]]:
    data_dir = Path(os.environ.get("HARNESS_DATA_DIR", REPO.parent / "shared" / "data"))
    with gzip.open(data_dir / DATA, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:limit]
    programs = [r["prompt"] + r["canonical_solution"] + r["suffix"] + "\n" + r["test"]
                + f"\ncheck({r['entry_point']})\n" for r in rows]
    return [r["task_id"] for r in rows], programs


def time_bare(argv: list[str], n: int, workers: int) -> float:
    """Seconds per launch of ``argv`` (no sandbox), n launches on the same kind of pool."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = list(pool.map(lambda _: subprocess.run(argv, stdout=subprocess.DEVNULL).returncode, range(n)))
    assert not any(codes)
    return (time.perf_counter() - start) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    args = parser.parse_args()

    task_ids, programs = load_programs(args.limit)
    print(f"{len(programs)} programs, {args.workers} workers, network isolation: "
          f"{network_isolation_available()}, filesystem isolation: {filesystem_isolation_available()}")
    start = time.perf_counter()
    results = run_many(programs, workers=args.workers)
    per_exec = (time.perf_counter() - start) / len(programs)
    failures = [(t, r) for t, r in zip(task_ids, results) if not r.passed]
    for task_id, r in failures:
        print(f"FAIL {task_id}: {r.status} rc={r.returncode}\n{r.stderr[-2000:]}")

    n_bare = min(len(programs), 200)
    bare = time_bare([sys.executable, "-c", "pass"], n_bare, args.workers)
    bare_isolated = time_bare([sys.executable, "-I", "-S", "-c", "pass"], n_bare, args.workers)
    print(f"sandboxed HumanEval: {1 / per_exec:.1f} exec/s ({per_exec * 1e3:.1f} ms each)")
    print(f"bare `python -c pass`: {1 / bare:.1f} exec/s; sandbox/bare = {per_exec / bare:.2f}x")
    print(f"bare `python -I -S -c pass`: {1 / bare_isolated:.1f} exec/s; "
          f"sandbox/bare = {per_exec / bare_isolated:.2f}x")
    print(f"{len(programs) - len(failures)}/{len(programs)} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
