"""The main job end to end on the embedded default model (`make demo`).

1. adapt SmolLM2-135M into a diffusion model with the quick preset (skipped when already done);
2. evaluate the adapted DLM and its AR parent on accuracy and infilling with small limits;
3. measure throughput of both;
4. render the report from the store.

Each step is the `harness` command a user would type; they are printed as they run.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console()


def harness(*args: str) -> None:
    command = ["harness", *args]
    console.print(f"\n[bold cyan]$ {shlex.join(command)}[/]")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args])
    if done.returncode != 0:
        console.print(f"[red]step failed with exit code {done.returncode}[/]")
        sys.exit(done.returncode)
    console.print(f"[dim]({time.perf_counter() - started:.0f} s)[/]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", default="reports/demo", help="where the report is written")
    parser.add_argument("--work", default="runs/demo", help="store, run files and the adapted checkpoint")
    parser.add_argument("--limit", type=int, default=16, help="documents per task")
    args = parser.parse_args()
    work, data = Path(args.work), args.data_dir
    adapted = work / "adapted"
    store = ["--output", str(work)]
    started = time.perf_counter()

    if (adapted / "final").exists():
        console.print(f"[dim]adapted checkpoint found at {adapted / 'final'}; skipping training[/]")
    else:
        harness("adapt", "--base", "smollm2-135m", "--preset", "quick", "--data",
                f"{data}/pretrain_corpus/wiki_demo.txt", "--out", str(adapted), "--overwrite")
    dlm = str(adapted / "final")
    for model, extra in (("smollm2-135m", []), (dlm, ["--model-args", "estimator=mc_time,samples=8"])):
        harness("run", "--model", model, "--suite", "accuracy-quick", "--limit", str(args.limit),
                "--data-dir", data, *store, *extra)
        harness("run", "--model", model, "--tasks", "rocstories_infill,humaneval_infill_single", "--limit",
                str(args.limit // 2), "--allow-code-exec", "--data-dir", data, *store)
    harness("bench", "--suite", "throughput-quick", "--model", "smollm2-135m", "--model", dlm,
            "--steps", "8", "--data-dir", data, *store)
    harness("report", "--all", "--out", args.out, *store)
    console.print(f"\n[bold green]demo finished in {(time.perf_counter() - started) / 60:.1f} min[/]; "
                  f"report: {Path(args.out) / 'index.html'} and {Path(args.out) / 'index.md'}")


if __name__ == "__main__":
    main()
