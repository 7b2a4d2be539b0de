"""The main job end to end on the embedded default model (`make demo`).

1. adapt SmolLM2-135M into a diffusion model with the quick preset (skipped when already done);
2. evaluate the adapted DLM and its AR parent on accuracy and infilling with small limits;
3. measure throughput of both;
4. render the report from the store.

Each step is the `harness` command a user would type; they are printed as they run, and the
report folder gets a COMMANDS.md listing the commands this demo ran, with their wall times.
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
RAN: list[tuple[str, float]] = []  # (command, wall seconds) of every step, for COMMANDS.md


def harness(*args: str) -> None:
    command = shlex.join(["harness", *args])
    console.print(f"\n[bold cyan]$ {command}[/]")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "harness.cli", *args])
    if done.returncode != 0:
        console.print(f"[red]step failed with exit code {done.returncode}[/]")
        sys.exit(done.returncode)
    RAN.append((command, time.perf_counter() - started))
    console.print(f"[dim]({RAN[-1][1]:.0f} s)[/]")


def commands_md(argv: list[str], ran: list[tuple[str, float]], skipped: str | None, minutes: float) -> str:
    """COMMANDS.md: how the report beside it was made, from the commands this demo ran."""
    lines = ["# How this report was made", "", "Written by `python -m harness.demo` (what `make demo` runs):", "",
             "```bash", shlex.join(["python", "-m", "harness.demo", *argv]), "```", "",
             "which ran, in order (wall time of each step):", "", "```bash"]
    lines += [f"{command}  # {seconds:.0f} s" for command, seconds in ran]
    lines += ["```", ""] + ([skipped, ""] if skipped else []) + [f"The demo took {minutes:.1f} min in all.", ""]
    return "\n".join(lines)


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
    skipped = None
    if (adapted / "final").exists():
        skipped = (f"The adaptation step was skipped: `{adapted / 'final'}` already held a checkpoint "
                   "(delete it to train again).")
        console.print(f"[dim]{skipped}[/]")
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
    minutes = (time.perf_counter() - started) / 60
    (Path(args.out) / "COMMANDS.md").write_text(commands_md(sys.argv[1:], RAN, skipped, minutes), encoding="utf-8")
    console.print(f"\n[bold green]demo finished in {minutes:.1f} min[/]; "
                  f"report: {Path(args.out) / 'index.html'}, {Path(args.out) / 'index.md'} and COMMANDS.md")


if __name__ == "__main__":
    main()
