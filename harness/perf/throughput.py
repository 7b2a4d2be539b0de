"""One measurement: a model variant at one setting (generation length, steps, batch, prompt length).

Variants: ``kv_cache`` and ``no_cache`` (Hugging Face ``generate``, greedy, ``use_cache`` on or
off, exactly ``gen_length`` new tokens through ``min_new_tokens``), ``vllm`` (see ``vllm_ar``), and
one per diffusion sampler (``llada``, ``diffugpt``, ``threshold``, ``entropy_bounded``) whose
canvas is the prompt followed by ``gen_length`` masks, sampled as the backend's ``fill`` does (the
backend's sampler settings, no stop strings). A request is one batch of ``batch_size`` prompts.

Per setting: ``warmup`` untimed requests, then ``repeats`` first-token calls and ``repeats``
requests, each timed between device synchronisations. A record holds:

* ``generated_tokens``: per request, the generated tokens of its rows. A row's generated tokens
  are its new tokens up to and including its first EOS (all ``gen_length`` of them without one);
  what follows an EOS is padding and never counts, nor do prompt tokens or canvas padding. AR
  rows cannot stop early (``min_new_tokens``), so they count ``gen_length``; a DLM row counts its
  fill region up to its first EOS.
* ``tokens_per_s``: generated tokens / wall time of the timed requests.
* ``tpf`` (tokens per forward): ``generated_tokens`` / (``nfe`` x ``batch_size``): the tokens a
  row gets from one forward pass. An AR row gets one token a forward (1.0); a DLM row gets its
  generated tokens / denoiser calls.
* ``latency_s``: p50/p95/mean of the request wall time. ``first_token_s``: AR: the prefill and
  the first new token (a one-token ``generate`` call); DLM: one denoiser call on the full canvas
  (the first step).
* ``nfe``: model forward calls per request (a call runs the whole batch; a guided DLM call runs
  each row twice and still counts once); ``processed_tokens``: the input positions those calls
  ran over (padding included), both counted by a hook on the model.
* ``peak_memory_bytes`` / ``peak_memory_source``: see ``timing.PeakMemory``.
* ``mfu``: 2 x params x processed tokens / time / ``peak_flops``. With a KV cache that is
  prompt + gen - 1 positions a row, without one every step reruns the sequence, and every DLM
  step runs the whole canvas: (prompt + gen) x NFE. Params: all parameters (tied ones once);
  attention-score FLOPs are left out.
* ``bandwidth_fraction``: forward calls/s x weight bytes / ``peak_bandwidth``: the share of the
  memory-bandwidth bound spent reading the weights, once a call (for batch-1 AR decoding:
  tokens/s x weight bytes / bandwidth).

Prompts are deterministic: windows of ``prompt_length`` token ids cut at seeded offsets from real
text (``pretrain_corpus/wiki_demo.txt`` under the data dir), or, without a data dir, a fixed
built-in sentence repeated; ``prompt_source`` in the record says which. Every variant gets the
same prompt ids for a setting, with no BOS or other token added.
"""
from __future__ import annotations

import itertools
import random
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from harness.errors import HarnessError
from harness.models.diffusion.estimators import right_pad
from harness.models.diffusion.samplers import FillRequest
from harness.perf.timing import ForwardCounter, PeakMemory, summary, timed

AXES = ("gen_length", "steps", "batch_size", "prompt_length")
CORPUS = Path("pretrain_corpus") / "wiki_demo.txt"
CORPUS_CHARS = 200_000  # enough text for any prompt window, quick to tokenise
BUILTIN_TEXT = "The committee met on a quiet morning to discuss the river, the bridge and the old mill. "
STEPPED_SAMPLERS = ("llada", "diffugpt")  # the samplers that take a number of steps


@dataclass(frozen=True)
class Setting:
    gen_length: int
    prompt_length: int
    batch_size: int = 1
    steps: int | None = None  # diffusion steps; None for AR and step-free samplers

    def label(self) -> str:
        steps = f" s{self.steps}" if self.steps else ""
        return f"g{self.gen_length}{steps} b{self.batch_size} p{self.prompt_length}"


def sweep(options: dict[str, Any]) -> list[Setting]:
    """Settings from the option lists of ``AXES``: ``grid: axes`` (default) takes the first value of
    every axis and then varies one axis at a time; ``grid: product`` takes every combination."""
    values = {axis: list(options.get(axis) or [None]) for axis in AXES}
    if options.get("grid", "axes") == "product":
        combos = [dict(zip(AXES, combo)) for combo in itertools.product(*values.values())]
    elif options.get("grid", "axes") == "axes":
        base = {axis: vals[0] for axis, vals in values.items()}
        combos = [base] + [{**base, axis: v} for axis, vals in values.items() for v in vals[1:]]
    else:
        raise HarnessError(f"grid must be axes or product, not '{options['grid']}'")
    if any(c["gen_length"] is None or c["prompt_length"] is None for c in combos):
        raise HarnessError("a throughput sweep needs gen_length and prompt_length")
    return list(dict.fromkeys(Setting(c["gen_length"], c["prompt_length"], c["batch_size"] or 1, c["steps"])
                              for c in combos))


@dataclass
class Variant:
    """How to run one request and one first-token call, and what the counter hooks."""

    name: str  # kv_cache | no_cache | vllm | a sampler name
    backend: str  # hf_ar | diffusion | vllm
    run: Callable[[list[list[int]], Setting], int]  # one request -> generated tokens counted
    first: Callable[[list[list[int]], Setting], Any]  # prefill + first token, or the first step
    params: int
    weight_bytes: int
    module: torch.nn.Module | None = None  # forward calls are counted on it
    counts: Callable[[Setting], tuple[float, float]] | None = None  # (calls, positions) without a module
    configure: Callable[[Setting], None] = lambda setting: None  # put the backend in this setting
    describe: Callable[[Setting], dict[str, Any]] = lambda setting: {}  # the backend's settings, as run

    def adapt(self, setting: Setting) -> Setting | None:
        """The setting as this variant runs it (steps only for stepped samplers), or None to skip."""
        if self.name.split("+")[0] not in STEPPED_SAMPLERS:  # "llada+dual" steps like "llada"
            return replace(setting, steps=None)
        return None if setting.steps is not None and setting.steps > setting.gen_length else setting


def weights_of(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters, bytes); tied weights count once."""
    unique = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in unique), sum(p.numel() * p.element_size() for p in unique)


def count_generated(new_tokens: torch.Tensor, eos_id: int | None) -> int:
    """New tokens [B, G] counted per row up to and including the first EOS; what follows is padding."""
    if eos_id is None:
        return new_tokens.numel()
    eos = (new_tokens == eos_id).long()
    return int(((eos.cumsum(1) - eos) == 0).sum())


def fill_counted(lm, fills: list[FillRequest]) -> int:
    """Sample ``fills`` with the backend's ``fill``; the generated tokens of the rows: each row's fill
    region (``extra["tokens"]``) up to and including its first EOS."""
    eos = lm.tokenizer.eos_token_id
    rows = [r.extra["tokens"] for r in lm.fill(fills)]
    return sum(tokens.index(eos) + 1 if eos in tokens else len(tokens) for tokens in rows)


def hf_variants(lm, modes: Sequence[str]) -> list[Variant]:
    """``kv_cache`` / ``no_cache`` variants of an ``HFCausalLM``."""
    model, tok = lm.model, lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    params, weight_bytes = weights_of(model)

    def generate(prompts: list[list[int]], new: int, use_cache: bool) -> int:
        ids = torch.tensor(prompts, device=lm.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=use_cache, pad_token_id=pad)
        return count_generated(out[:, ids.shape[1]:], tok.eos_token_id)

    variants = []
    for mode in modes:
        if mode not in ("kv_cache", "no_cache"):
            raise HarnessError(f"unknown AR mode '{mode}' (known: kv_cache, no_cache, vllm)")
        cache = mode == "kv_cache"
        variants.append(Variant(
            mode, "hf_ar", run=lambda p, s, c=cache: generate(p, s.gen_length, c),
            first=lambda p, s, c=cache: generate(p, 1, c), params=params, weight_bytes=weight_bytes,
            module=model, describe=lambda s, c=cache: {**lm.fingerprint, "use_cache": c}))
    return variants


def dlm_variants(lm, samplers: Sequence[str], caches: Sequence[str] = ("none",)) -> list[Variant]:
    """One variant per sampler and cache mode of a ``DiffusionLM`` (named ``sampler`` or
    ``sampler+cache``, see ``variant_caches``); each sets the backend's sampler and cache before it runs."""
    from harness.models.diffusion.samplers import SAMPLERS

    mask = lm.denoiser.mask_id
    params, weight_bytes = weights_of(lm.denoiser.model)

    def configure(setting: Setting, sampler: str, cache: str) -> None:
        lm.use_sampler(name=sampler, steps=setting.steps)
        lm.use_cache(cache)

    def run(prompts: list[list[int]], setting: Setting, sampler: str, cache: str) -> int:
        if len(prompts) > lm.rows_per_call:
            raise HarnessError(f"batch {len(prompts)} exceeds the backend's {lm.rows_per_call} rows a call")
        configure(setting, sampler, cache)
        return fill_counted(lm, [FillRequest(p, setting.gen_length, (), str(i)) for i, p in enumerate(prompts)])

    def first(prompts: list[list[int]], setting: Setting) -> Any:
        return lm.denoise(*right_pad([p + [mask] * setting.gen_length for p in prompts], mask))

    def describe(setting: Setting, sampler: str, cache: str) -> dict[str, Any]:
        return {**lm.fingerprint, "sampler": {**asdict(lm.sampler), "name": sampler, "steps": setting.steps},
                "cache": {**asdict(lm.cache), "mode": cache}}

    variants = []
    for sampler in samplers:
        if sampler not in SAMPLERS:
            raise HarnessError(f"unknown sampler '{sampler}' (known: {', '.join(SAMPLERS)})")
        if sampler == "diffugpt" and lm.block_size:
            continue  # a block model decodes block by block
        for cache in variant_caches(caches, sampler, lm.block_size):
            variants.append(Variant(
                sampler if cache == "none" else f"{sampler}+{cache}", "diffusion",
                run=lambda p, s, n=sampler, c=cache: run(p, s, n, c), first=first, params=params,
                weight_bytes=weight_bytes, module=lm.denoiser.model,
                configure=lambda s, n=sampler, c=cache: configure(s, n, c),
                describe=lambda s, n=sampler, c=cache: describe(s, n, c)))
    return variants


def variant_caches(caches: Sequence[str], sampler: str, block_size: int | None) -> list[str]:
    """The cache modes a sampler is timed with: diffugpt decodes no blocks (no cache); a block
    model's only cache is its exact ``prefix`` one, which stands in for ``dual`` too."""
    if sampler == "diffugpt":
        return ["none"]
    if block_size:
        return list(dict.fromkeys("none" if c == "none" else "prefix" for c in caches))
    return list(caches)


def prompt_text(data_dir: Path | None) -> tuple[str, str]:
    """(text, source label) for synthetic prompts."""
    if data_dir is not None and (data_dir / CORPUS).is_file():
        return (data_dir / CORPUS).read_text(encoding="utf-8")[:CORPUS_CHARS], f"data:{CORPUS}"
    return BUILTIN_TEXT * 400, "builtin:repeated-sentence"


def synthetic_prompts(ids: Sequence[int], length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``length`` ids at offsets drawn from ``seed`` (the ids repeat if short)."""
    if not ids:
        raise HarnessError("no prompt tokens: the prompt text tokenised to nothing")
    pool = list(ids) * (length // len(ids) + 2)
    rng = random.Random(seed)
    return [pool[start:start + length] for start in (rng.randrange(len(ids)) for _ in range(count))]


def measure(variant: Variant, setting: Setting, prompts: list[list[int]], *, device: str, repeats: int,
            warmup: int, limits: dict[str, Any]) -> dict[str, Any]:
    """Time ``variant`` at ``setting`` on ``prompts`` and return the measurement record."""
    if repeats < 1 or warmup < 0:
        raise HarnessError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        variant.run(prompts, setting)
    with PeakMemory(device) as memory:
        first = [timed(lambda: variant.first(prompts, setting), device)[1] for _ in range(repeats)]
        latencies, tokens = [], 0
        counter = ForwardCounter(variant.module) if variant.module is not None else None
        with counter or nullcontext():
            for _ in range(repeats):
                n, seconds = timed(lambda: variant.run(prompts, setting), device)
                tokens, latencies = tokens + n, latencies + [seconds]
    calls, positions = ((counter.calls / repeats, counter.tokens / repeats) if counter
                        else variant.counts(setting))
    per_request = sum(latencies) / repeats
    flops = 2 * variant.params * positions
    row_forwards = calls * len(prompts)
    return {
        "variant": variant.name, "backend": variant.backend, "setting": asdict(setting),
        "fingerprint": variant.describe(setting),
        "repeats": repeats, "warmup": warmup, "generated_tokens": tokens / repeats,
        "tokens_per_s": tokens / sum(latencies), "tpf": tokens / repeats / row_forwards if row_forwards else None,
        "latency_s": summary(latencies), "first_token_s": summary(first),
        "first_token_kind": "first_step" if variant.backend in ("diffusion", "diffusion_gemma") else "first_token",
        "nfe": calls, "processed_tokens": positions, "params": variant.params, "weight_bytes": variant.weight_bytes,
        "peak_memory_bytes": memory.bytes, "peak_memory_source": memory.source,
        "mfu": flops / per_request / limits["peak_flops"],
        "bandwidth_fraction": calls * variant.weight_bytes / per_request / limits["peak_bandwidth"],
        "peak_flops": limits["peak_flops"], "peak_bandwidth": limits["peak_bandwidth"],
    }


