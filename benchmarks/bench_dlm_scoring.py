"""Batched DLM scoring against the papers' naive protocol, and the sampler's overhead.

    python benchmarks/bench_dlm_scoring.py --data-dir ../shared/data                # 50 questions, T = 32
    python benchmarks/bench_dlm_scoring.py --data-dir ../shared/data --questions 5  # a quick run

Model: SmolLM2-135M run with full attention plus an added mask token (``untrained-dlm:smollm2-135m``
of ``harness bench``: untrained, which does not matter for timing). Scoring: the ``paper_grid``
estimator with T timesteps on the 4 choices of each HellaSwag question, once the harness's way
(the rows of all requests batched longest first, ``--batch`` rows a denoiser call) and once the
way the papers' evaluation scripts do it (one forward pass per timestep per choice, batch 1).
Same estimator, same seeds: the scores agree up to the floating-point differences between batch
shapes, and the largest difference is printed. Target: batched at least 2x faster on a 2-core CPU.

Sampler overhead: the wall time of a ``generate`` call minus the time of its NFE bare forward
passes (``denoiser.model``, timed by hooks inside the same call, so that load from other processes
hits both alike), as a fraction of the wall time; the median of ``--repeats`` calls. Target: at
most 10%.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from harness.catalog import catalog
from harness.models.base import GenerateRequest
from harness.models.factory import build_model
from harness.perf.untrained import untrained_dlm
from harness.perf.timing import ForwardTimer, timed
from harness.tasks.data import resolve_data_dir


def score(lm, requests, rows_per_call: int) -> tuple[list[float], float, int]:
    """(log-likelihoods, seconds, denoiser calls) with ``rows_per_call`` model rows a call."""
    lm.rows_per_call = rows_per_call
    before = lm.forward_passes
    results, seconds = timed(lambda: lm.loglikelihood(requests), lm.device)
    return [r.logprob for r in results], seconds, lm.forward_passes - before


def sampler_overhead(lm, request: GenerateRequest) -> tuple[float, float, int]:
    """(overhead fraction, wall seconds, NFE) of one generate call: the share of its wall time spent
    outside the denoiser's forward passes, which are timed inside the same call."""
    with ForwardTimer(lm.denoiser.model, lm.device) as forward:
        _, wall = timed(lambda: lm.generate([request]), lm.device)
    return (wall - forward.seconds) / wall, wall, forward.calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="Folder with hellaswag/ (or $HARNESS_DATA_DIR).")
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--timesteps", type=int, default=32, help="T of the paper_grid estimator.")
    parser.add_argument("--batch", type=int, default=32, help="Model rows a denoiser call on the batched path.")
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--sampler-steps", type=int, default=32)
    parser.add_argument("--sampler", default="llada")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--part", choices=("all", "scoring", "overhead"), default="all")
    args = parser.parse_args()

    task = catalog().task("hellaswag", resolve_data_dir(args.data_dir))
    docs = task.docs()[:args.questions]
    requests = [r for doc in docs for r in task.requests(doc)]
    lm = build_model(str(untrained_dlm("smollm2-135m")), device=args.device, batch_size=args.batch,
                     model_args={"estimator": "paper_grid", "samples": args.timesteps})
    lm.seed = args.seed
    print(f"SmolLM2-135M, full attention, untrained mask token; torch threads {torch.get_num_threads()}; "
          f"{len(docs)} HellaSwag questions, {len(requests)} choices, paper_grid T={args.timesteps}")

    if args.part in ("all", "scoring"):
        score(lm, requests[:4], args.batch)  # warm-up
        batched, batched_s, batched_calls = score(lm, requests, args.batch)
        naive, naive_s, naive_calls = score(lm, requests, 1)
        gap = max(abs(a - b) for a, b in zip(batched, naive))
        print(f"batched ({args.batch} rows a call): {batched_s:8.1f} s  {batched_calls:6d} denoiser calls")
        print(f"naive (batch 1):        {naive_s:8.1f} s  {naive_calls:6d} denoiser calls")
        print(f"speed-up: {naive_s / batched_s:.2f}x   largest |score difference|: {gap:.2e}")
    if args.part == "scoring":
        return
    lm.use_sampler(name=args.sampler, steps=args.sampler_steps)
    request = GenerateRequest(" ".join(doc["context"] for doc in docs[:3]), max_tokens=args.gen_length)
    lm.generate([request])  # warm-up
    runs = [sampler_overhead(lm, request) for _ in range(args.repeats)]
    fraction = statistics.median(run[0] for run in runs)
    print(f"sampler overhead ({args.sampler}, {args.gen_length} tokens, {runs[0][2]} NFE): {fraction:.1%} of "
          f"{statistics.median(run[1] for run in runs):.2f} s (per call: {', '.join(f'{run[0]:.1%}' for run in runs)})")


if __name__ == "__main__":
    main()
