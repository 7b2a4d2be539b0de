"""Time `harness` log-likelihood scoring against lm-eval's HF backend on the same requests.

Same machine, model (SmolLM2-135M, float32, CPU), examples (200 lambada_openai, 100 hellaswag)
and batch size, in one process: prints each side's time, the speed ratio, and model-FLOPs
utilisation (2 x parameters x forwarded tokens / time) over the large-matmul FLOP/s that the
same run measures. HellaSwag's four endings share their context, which the harness encodes once.

    python benchmarks/bench_vs_lm_eval.py --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from harness.catalog import catalog
from harness.models.factory import build_model
from harness.models.loading import resolve_weights
from harness.perf.probe import probe
from harness.validate import lm_eval_hf, lm_eval_loglikelihoods


def forwarded_tokens_harness(lm, requests) -> int:
    return sum(row.length - len(row.branches) for row in lm.pack([lm.encode_pair(r)
                                                                   for r in requests]))


def forwarded_tokens_lm_eval(lm, requests) -> int:
    return sum(len(c) + len(k) - 1 for c, k in (lm.encode_pair(r) for r in requests))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lambada", type=int, default=200)
    parser.add_argument("--hellaswag", type=int, default=100)
    args = parser.parse_args()

    peak = probe("cpu", "float32")["peak_flops"]
    lm = build_model("smollm2-135m", batch_size=args.batch_size)
    params = sum(p.numel() for p in lm.model.parameters())
    reference = lm_eval_hf(resolve_weights(catalog().models.get("smollm2-135m").weights), args.batch_size, "float32")
    print(f"torch threads {torch.get_num_threads()}, batch size {args.batch_size}, "
          f"large-matmul peak {peak / 1e9:.1f} GFLOP/s, {params / 1e6:.1f}M parameters")
    print(f"{'task':<16}{'requests':>9}{'harness s':>11}{'lm-eval s':>11}{'speed-up':>10}"
          f"{'MFU harness':>13}{'MFU lm-eval':>13}{'max |Δll|':>11}")
    for name, count in (("lambada_openai", args.lambada), ("hellaswag", args.hellaswag)):
        task = catalog().task(name, args.data_dir)
        requests = [r for doc in task.docs()[:count] for r in task.requests(doc)]
        lm.loglikelihood(requests[:4])  # warm-up
        lm_eval_loglikelihoods(reference, requests[:4])
        began = time.perf_counter()
        ours = lm.loglikelihood(requests)
        ours_s = time.perf_counter() - began
        began = time.perf_counter()
        theirs = lm_eval_loglikelihoods(reference, requests)
        theirs_s = time.perf_counter() - began
        mfu_ours = 2 * params * forwarded_tokens_harness(lm, requests) / ours_s / peak
        mfu_theirs = 2 * params * forwarded_tokens_lm_eval(lm, requests) / theirs_s / peak
        delta = max(abs(a.logprob - b.logprob) for a, b in zip(ours, theirs))
        print(f"{name:<16}{len(requests):>9}{ours_s:>11.1f}{theirs_s:>11.1f}{theirs_s / ours_s:>9.2f}x"
              f"{mfu_ours:>13.1%}{mfu_theirs:>13.1%}{delta:>11.1e}")


if __name__ == "__main__":
    main()
