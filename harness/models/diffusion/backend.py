"""Masked-diffusion backend: a full-attention or block-diffusion denoiser behind the same scorer
interface as AR models.

The denoiser's logits are aligned so that position i predicts token i for both families (the
shifted, AR-adapted models have their logits moved one place right). Log-likelihoods come from a
selectable estimator, generation and infilling from a selectable sampler; every setting is in the
fingerprint. Tokenisation of (context, continuation) pairs is lm-eval's, as for AR models. A
block-diffusion model (its denoiser has a ``block_size``) scores with the block ELBO
(``estimators.blockwise``) and samples block by block over its exact cache (``cache=prefix``).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import torch

from harness.config import ModelCard
from harness.errors import HarnessError
from harness.models.base import (GenerateRequest, GenerationResult, InfillRequest, LanguageModel,
                                 LoglikelihoodRequest, LoglikelihoodResult, RollingRequest, RollingResult,
                                 encode_segments, split_pair, token_budget, truncate_at_stops)
from harness.models.batching import parse_batch_size
from harness.models.diffusion.estimators import LikelihoodRequest, estimate
from harness.models.diffusion.estimators.blockwise import estimate_blockwise
from harness.models.diffusion.estimators.scoring import logits_at
from harness.models.diffusion.formats import Denoiser, load_denoiser
from harness.models.diffusion.samplers import SAMPLERS, FillRequest
from harness.hashing import stable_hash
from harness.models.settings import CacheSettings, DiffusionSettings, SamplerSettings

# what a request's gen_kwargs may override in the sampler settings
REQUEST_SAMPLER_SETTINGS = ("steps", "temperature", "top_p")


class DiffusionLM(LanguageModel):
    is_diffusion = True

    def __init__(self, denoiser: Denoiser, *, name: str, dtype: str = "float32", device: str = "cpu",
                 batch_size: int | str = 16, settings: DiffusionSettings | None = None):
        settings = settings or DiffusionSettings()
        size, auto = parse_batch_size(batch_size)
        self.rows_per_call = size
        self.denoiser, self.name, self.dtype, self.device = denoiser, name, dtype, device
        self.tokenizer = denoiser.tokenizer
        self.estimator, self.sampler, self.cache = settings.estimator, settings.sampler, settings.cache
        bos = self.tokenizer.bos_token_id
        self.prefix_token = bos if bos is not None else self.tokenizer.eos_token_id
        self.start_token = settings.start_token
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>") if hasattr(self.tokenizer, "convert_tokens_to_ids") else None
        self.eot_id = eot if isinstance(eot, int) and eot != self.tokenizer.unk_token_id else None
        self.forward_passes = 0
        self.base_model = settings.base_model
        self.block_size = getattr(denoiser, "block_size", None)  # block diffusion: block-causal attention
        self.sampler = self.fit_blocks(self.sampler)

    def fit_blocks(self, sampler: SamplerSettings) -> SamplerSettings:
        """A block model's sampler decodes its blocks: ``block_length`` defaults to the block size
        and must divide it; ``diffugpt`` (the whole fill at once) is refused."""
        if not self.block_size:
            return sampler
        if sampler.name == "diffugpt":
            raise HarnessError(f"sampler diffugpt fills the whole canvas at once; a block-diffusion model "
                               f"(block size {self.block_size}) decodes block by block: llada, threshold, entropy_bounded")
        if sampler.block_length is None:
            return replace(sampler, block_length=self.block_size)
        if self.block_size % sampler.block_length:
            raise HarnessError(f"block_length {sampler.block_length} does not divide the model's block size "
                               f"{self.block_size}")
        return sampler

    @classmethod
    def from_card(cls, card: ModelCard, settings: DiffusionSettings, *, device: str, dtype: str,
                  batch_size: int | str) -> "DiffusionLM":
        spec = card.diffusion
        load = dict(settings.load)
        source = card.weights.get("path") or card.weights.get("hub")
        if source is None:
            raise HarnessError(f"diffusion model '{card.name}' needs weights.path or weights.hub")
        denoiser = load_denoiser(source, load.pop("format", spec.format if spec else None), dtype=dtype,
                                 device=device, mask_id=load.pop("mask_id", spec.mask_id if spec else None), **load)
        if spec is not None and denoiser.shifted != (spec.kind == "shifted"):
            raise HarnessError(f"card '{card.name}' says {spec.kind} but the {denoiser.format} checkpoint is "
                               f"{'shifted' if denoiser.shifted else 'unshifted'}")
        if spec is not None and spec.block_size is not None and spec.block_size != denoiser.block_size:
            found = f"block size {denoiser.block_size}" if denoiser.block_size else "full attention"
            raise HarnessError(f"card '{card.name}' says block size {spec.block_size} but the {denoiser.format} "
                               f"checkpoint has {found}")
        if settings.base_model is None:
            settings = replace(settings, base_model=diffusion_base_model(source))
        return cls(denoiser, name=card.name, dtype=dtype, device=device, batch_size=batch_size, settings=settings)

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt and fill) the denoiser takes."""
        return self.denoiser.max_length

    def use_cache(self, mode: str, refresh: int | None = None) -> CacheSettings:
        """Switch the key/value cache (``none`` | ``prefix`` | ``dual``) for later calls."""
        self.cache = CacheSettings(mode, refresh)
        return self.cache

    def use_sampler(self, **changes: Any) -> SamplerSettings:
        """Switch the sampler settings (validated) for later calls; returns the new settings."""
        self.sampler = self.fit_blocks(replace(self.sampler, **changes))
        return self.sampler

    @property
    def fingerprint(self) -> dict[str, Any]:
        d = self.denoiser
        return {"backend": "diffusion", "name": self.name, "weights": d.source, "format": d.format,
                "base_model": self.base_model,
                "kind": "shifted" if d.shifted else "unshifted", "mask_id": d.mask_id, "dtype": self.dtype,
                "device": self.device, "batch_size": self.rows_per_call, "estimator": asdict(self.estimator),
                "sampler": asdict(self.sampler), "cache": asdict(self.cache), "seed": self.seed,
                "start_token": self.start_token, **({"block_size": self.block_size} if self.block_size else {}),
                **({"load": d.settings} if getattr(d, "settings", None) else {})}

    # ---- the aligned denoiser -------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at position i predict token i, for shifted and unshifted models alike; with
        ``positions`` [B, P], only there ([B, P, V]: the head runs nowhere else)."""
        self.forward_passes += 1
        model, ids, mask = self.denoiser.model, input_ids.to(self.device), attention_mask.to(self.device)
        if positions is None:
            logits = model(ids, mask)
            return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if self.denoiser.shifted else logits
        read = (positions - 1).clamp(min=0) if self.denoiser.shifted else positions  # shifted: i from i - 1
        return logits_at(model, ids, mask, read.to(self.device))

    denoise.takes_positions = True  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def start(self, ids: list[int]) -> list[int]:
        """``ids`` after the start token (``start_token=bos``: the tokenizer's BOS, else its EOS;
        ``none``: nothing, as the DiffuGPT scripts give GPT-2; a shifted model still gets one before
        an empty context, since it needs a position before the first token it predicts)."""
        if self.start_token == "bos" or not ids and self.denoiser.shifted:
            return [self.prefix_token] + ids
        return ids

    def encode_pair(self, request: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        """lm-eval's split (or the request's separately encoded segments), after the start token."""
        if request.segments:
            context_ids, continuation_ids = encode_segments(self.encode, request.context, request.segments)
        else:
            context_ids, continuation_ids = split_pair(self.encode, request.context, request.continuation)
        return self.start(context_ids), continuation_ids

    def fit_context(self, context: list[int], continuation: list[int]) -> list[int]:
        room = self.denoiser.max_length - len(continuation)
        if room < 1:
            raise HarnessError(f"a continuation of {len(continuation)} tokens does not fit the model's context of "
                               f"{self.denoiser.max_length} tokens")
        return context[-room:]

    # ---- log-likelihood ---------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        pairs = [self.encode_pair(r) for r in requests]
        estimates = self._estimate([(self.fit_context(c, k), k) for c, k in pairs],
                                   [stable_hash([r.context, r.continuation]) for r in requests])
        return [LoglikelihoodResult(logprob=e.logprob, is_greedy=e.is_greedy, n_tokens=e.n_tokens, stderr=e.stderr)
                for e in estimates]

    def _estimate(self, pairs: list[tuple[list[int], list[int]]], keys: list[str]):
        settings = self.estimator
        requests = [LikelihoodRequest(c, k, key) for (c, k), key in zip(pairs, keys)]
        options = dict(mask_id=self.denoiser.mask_id, method=settings.method, samples=settings.samples,
                       seed=self.seed, batch_size=self.rows_per_call, eps=settings.eps,
                       cfg_scale=settings.cfg_scale, greedy=settings.greedy)
        if self.block_size:
            return estimate_blockwise(self.denoise, requests, block_size=self.block_size, **options)
        return estimate(self.denoise, requests, **options)

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[RollingResult]:
        """The ELBO (a lower bound on log-likelihood) over the same disjoint windows as the AR backend."""
        results = []
        for request in requests:
            window = min(request.window or self.denoiser.max_length, self.denoiser.max_length - 1)
            ids = self.encode(request.text)
            pairs = [(ids[start - 1:start] if start else [self.prefix_token], ids[start:start + window])
                     for start in range(0, len(ids), window)]
            keys = [stable_hash([request.text, start]) for start in range(0, len(ids), window)]
            estimates = self._estimate(pairs, keys)
            variance = sum(e.stderr ** 2 for e in estimates if e.stderr == e.stderr)
            results.append(RollingResult(logprob=sum(e.logprob for e in estimates), n_tokens=len(ids),
                                         exact=self.estimator.method == "chain_rule", stderr=variance ** 0.5))
        return results

    # ---- generation and infilling -----------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerationResult]:
        jobs = []
        for r in requests:
            context = self.start(self.encode(r.context))
            n_tokens = canvas_fill(r.gen_kwargs, context) or token_budget(r.max_tokens, r.reference, self.encode)
            context = self.fit_context(context, [0] * n_tokens)
            jobs.append(_Job(FillRequest(context, n_tokens, (), stable_hash([r.context, r.max_tokens])),
                             tuple(r.until), dict(r.gen_kwargs), r.context))
        return self._run_jobs(jobs, stop_at_eos=True)

    def infill(self, requests: Sequence[InfillRequest]) -> list[GenerationResult]:
        jobs = [_Job(FillRequest(self.start(self.encode(r.prefix)), token_budget(r.n_tokens, r.reference, self.encode),
                                 self.encode(r.suffix), stable_hash([r.prefix, r.suffix, r.n_tokens])),
                     (), dict(r.gen_kwargs), r.prefix) for r in requests]
        return self._run_jobs(jobs, stop_at_eos=False)

    def _run_jobs(self, jobs: list["_Job"], stop_at_eos: bool) -> list[GenerationResult]:
        """Skip what exceeds ``max_input_tokens``; sample the rest in groups of equal sampler
        overrides, as many stages as asked (each after the decoded text of the one before)."""
        out: list[GenerationResult | None] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            limit = job.gen_kwargs.get("max_input_tokens")
            size = len(job.fill.prefix_ids) + job.fill.n_tokens + len(job.fill.suffix_ids)
            if limit is not None and size > limit:
                out[i] = GenerationResult(text="", n_tokens=0, nfe=0, extra={"skipped": f"{size} tokens > {limit}"})
                continue
            overrides = tuple(sorted((k, job.gen_kwargs[k]) for k in REQUEST_SAMPLER_SETTINGS if k in job.gen_kwargs))
            groups.setdefault(overrides, []).append(i)
        for overrides, members in groups.items():
            settings = replace(self.sampler, **dict(overrides))
            fills = [jobs[i].fill for i in members]
            texts, stats = [""] * len(members), [(0, 0, 0.0, 0)] * len(members)
            for stage in range(max(int(jobs[i].gen_kwargs.get("stages", 1)) for i in members)):
                active = [m for m, i in enumerate(members) if stage < int(jobs[i].gen_kwargs.get("stages", 1))]
                if stage:
                    fills = self._next_stage(fills, [jobs[i] for i in members], texts, active)
                results = self._sample([fills[m] for m in active], [jobs[members[m]].until for m in active],
                                       stop_at_eos, settings)
                for m, result in zip(active, results):
                    n, nfe, latency, steps = stats[m]
                    texts[m] += result.text
                    stats[m] = (n + result.n_tokens, nfe + result.nfe, latency + result.latency_s,
                                steps + result.extra["steps"])
            for m, i in enumerate(members):
                n, nfe, latency, steps = stats[m]
                out[i] = GenerationResult(text=texts[m], n_tokens=n, nfe=nfe, latency_s=latency,
                                          extra={"sampler": settings.name, "steps": steps})
        return out  # type: ignore[return-value]

    def _next_stage(self, fills: list[FillRequest], jobs: list["_Job"], texts: list[str],
                    active: list[int]) -> list[FillRequest]:
        """Stage k + 1 of a row samples after its prompt text and everything decoded so far."""
        fills = list(fills)
        for m in active:
            context = self.start(self.encode(jobs[m].prompt + texts[m]))
            n_tokens = canvas_fill(jobs[m].gen_kwargs, context) or fills[m].n_tokens
            context = self.fit_context(context, [0] * n_tokens)
            fills[m] = FillRequest(context, n_tokens, fills[m].suffix_ids, fills[m].key + ":stage")
        return fills

    def block_cache(self, fills: Sequence[FillRequest], settings: SamplerSettings):
        """The caching denoiser for one batch of canvases (``harness.models.diffusion.cache``)."""
        from harness.models.diffusion.cache import BlockCache

        return BlockCache(self.denoiser.model, shifted=self.denoiser.shifted, mask_id=self.denoiser.mask_id,
                          fills=fills, block_length=settings.block_length, settings=self.cache)

    def fill(self, fills: Sequence[FillRequest], settings: SamplerSettings | None = None) -> list[GenerationResult]:
        """Sample token-level canvases as they are (no EOS cut, no stop strings): what the
        throughput bench times. ``settings``: the sampler settings to use (default the model's)."""
        return self._sample(list(fills), [()] * len(fills), stop_at_eos=False, settings=settings, keep_tokens=True)

    def _sample(self, fills: list[FillRequest], stops: list[Sequence[str]], stop_at_eos: bool,
                settings: SamplerSettings | None = None, keep_tokens: bool = False) -> list[GenerationResult]:
        settings = self.fit_blocks(settings or self.sampler)
        sample = SAMPLERS[settings.name]
        named = inspect.signature(sample).parameters
        kwargs = {k: v for k, v in asdict(settings).items() if k in named}
        if "aligned_blocks" in named:
            kwargs["aligned_blocks"] = bool(self.block_size)
        if "eos_id" in named:  # generation stops at EOS, so later blocks past every row's EOS are skipped
            kwargs.update(eos_id=self.tokenizer.eos_token_id, eot_id=self.eot_id,
                          eos_stop=settings.eos_stop or stop_at_eos)
        out: list[GenerationResult] = []
        eos = self.tokenizer.eos_token_id
        for start in range(0, len(fills), self.rows_per_call):
            batch = fills[start:start + self.rows_per_call]
            began = time.perf_counter()
            denoise = self.denoise if self.cache.mode == "none" else self.block_cache(batch, settings)
            result = sample(denoise, batch, mask_id=self.denoiser.mask_id, seed=self.seed, **kwargs)
            latency = time.perf_counter() - began
            for tokens, until in zip(result.tokens, stops[start:start + self.rows_per_call]):
                if stop_at_eos and eos in tokens:
                    tokens = tokens[:tokens.index(eos)]
                text = truncate_at_stops(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
                extra = {"sampler": settings.name, "steps": result.steps, **({"tokens": tokens} if keep_tokens else {})}
                out.append(GenerationResult(text=text, n_tokens=len(tokens), nfe=result.nfe, latency_s=latency,
                                            extra=extra))
        return out


def canvas_fill(gen_kwargs: dict[str, Any], context: list[int]) -> int | None:
    """With ``canvas_length``: the tokens left after the prompt (at least one), else None."""
    length = gen_kwargs.get("canvas_length")
    return None if length is None else max(1, int(length) - len(context))


@dataclass(frozen=True)
class _Job:
    """One generation or infilling request: its canvas, stops, per-request settings and prompt."""

    fill: FillRequest
    until: tuple[str, ...]
    gen_kwargs: dict[str, Any]
    prompt: str


def diffusion_base_model(source: str) -> str | None:
    """The AR parent recorded in a harness checkpoint's diffusion config, if any."""
    import json
    from pathlib import Path

    config = Path(source) / "diffusion_config.json"
    return json.loads(config.read_text()).get("base_model") if config.exists() else None
