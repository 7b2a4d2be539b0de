"""What each fast-decoding trick buys, measured in one run on one adapted DLM.

    python benchmarks/bench_dlm_cache.py --model runs/adapt/final --data-dir ../shared/data

Fast-dLLM's baseline setting: a prompt of ``--prompt-length`` tokens from the corpus, ``--gen-length``
new tokens in blocks of ``--block``, one token per step (``steps = gen-length``), greedy. Variants:
the head over every position (no logits-only-where-read) and, with it, no cache / prefix / dual /
dual + threshold 0.9 / dual + the entropy-bounded sampler (when installed). For each: wall time,
tokens per second, model passes (NFE), tokens per forward, the ratio to no cache, and the share of
output tokens equal to the no-cache output. Generated tokens are the fill tokens before the first
EOS. One process, one thread count, the same prompts for every variant.
"""
from __future__ import annotations

import argparse
import time

import torch

from harness.models.diffusion.samplers import SAMPLERS, FillRequest
from harness.models.factory import build_model
from harness.perf.throughput import prompt_text, synthetic_prompts
from harness.tasks.data import resolve_data_dir

VARIANTS = [  # name, model args, whether the head runs at every position
    ("all positions head, no cache", {"cache": "none"}, True),
    ("no cache", {"cache": "none"}, False),
    ("prefix cache", {"cache": "prefix"}, False),
    ("dual cache", {"cache": "dual"}, False),
    ("dual + threshold 0.9", {"cache": "dual", "sampler": "threshold", "threshold": 0.9}, False),
    ("dual + entropy bounded", {"cache": "dual", "sampler": "entropy_bounded"}, False),
]


def generated(tokens: list[int], eos: int | None) -> list[int]:
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


def run(model: str, args: dict, whole_head: bool, prompts: list[list[int]], gen_length: int, repeats: int):
    lm = build_model(model, batch_size=len(prompts), model_args=args)
    if whole_head:
        full = lm.denoise
        lm.denoise = lambda ids, mask: full(ids, mask)  # no positions: the head over every position
    fills = [FillRequest(p, gen_length, (), str(i)) for i, p in enumerate(prompts)]
    lm.fill([FillRequest(prompts[0], 2, (), "warm-up")])  # warm-up: two steps
    best, outputs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        results = lm.fill(fills)
        best = min(best, time.perf_counter() - start)
        outputs = results
    return best, outputs, lm.tokenizer.eos_token_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="A DLM checkpoint (the quick preset is fine).")
    parser.add_argument("--data-dir", type=str, default=None)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = {"sampler": "llada", "steps": args.gen_length, "block_length": args.block}
    probe = build_model(args.model)
    text, source = prompt_text(resolve_data_dir(args.data_dir))
    prompts = synthetic_prompts(probe.encode(text), args.prompt_length, args.batch, seed=1234)
    print(f"{args.model}: prompt {args.prompt_length} ({source}), {args.gen_length} new tokens, block {args.block}, "
          f"{args.gen_length} steps, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print("| variant | s | tokens/s | NFE | tokens/forward | vs no cache | same tokens as no cache |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    rows = []
    for name, extra, whole_head in VARIANTS:
        if extra.get("sampler", "llada") not in SAMPLERS:
            print(f"| {name} | (sampler not installed) | | | | | |")
            continue
        seconds, outputs, eos = run(args.model, {**base, **extra}, whole_head, prompts, args.gen_length, args.repeats)
        tokens = [r.extra["tokens"] for r in outputs]
        count = sum(len(generated(t, eos)) for t in tokens)
        if name == "no cache":
            reference = tokens
        rows.append((name, seconds, count, outputs[0].nfe, tokens))
    baseline = next(s for n, s, *_ in rows if n == "no cache")
    for name, seconds, count, nfe, tokens in rows:
        pairs = [(a, b) for out, ref in zip(tokens, reference) for a, b in zip(out, ref)]
        same = sum(a == b for a, b in pairs) / len(pairs)
        print(f"| {name} | {seconds:.1f} | {count / seconds:.2f} | {nfe} | {count / max(nfe, 1):.2f} | "
              f"{baseline / seconds:.2f}x | {same:.1%} |")


if __name__ == "__main__":
    main()
