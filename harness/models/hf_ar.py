"""Autoregressive backend over any Hugging Face causal LM.

Log-likelihood follows lm-eval's tokenisation (context encoded alone, continuation = the tail of
the encoded concatenation) so numbers match lm-eval's HF backend. Requests that share a context
(the choices of one question) are packed into one row: the context once, then each continuation
as its own branch, under a tree-shaped 4-D attention mask with restarted position ids. The head
is applied only at the positions that are scored.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from harness.models.base import (GenerateRequest, GenerationResult, InfillRequest, LanguageModel,
                                 LoglikelihoodRequest, LoglikelihoodResult, RollingRequest,
                                 RollingResult, encode_segments, split_pair, token_budget, truncate_at_stops)
from harness.models.batching import AutoBatch
from harness.models.settings import ARSettings


@dataclass
class PackedRow:
    context: list[int]
    branches: list[tuple[int, list[int]]]  # (request index, continuation ids)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(b) for _, b in self.branches)


class HFCausalLM(LanguageModel):
    def __init__(self, model, tokenizer, *, name: str, weights: str, dtype: str = "float32",
                 device: str = "cpu", batch_size: int | str = 16, settings: ARSettings | None = None):
        settings = settings or ARSettings()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.weights, self.dtype, self.device = weights, dtype, device
        self.batch = AutoBatch(batch_size)
        self.infill_mode = settings.infill_mode
        config = model.config
        self.max_length = settings.max_length or getattr(config, "max_position_embeddings", None) or 2048
        self.prefix_token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {"backend": "hf_ar", "name": self.name, "weights": self.weights, "dtype": self.dtype,
                "device": self.device, "batch_size": self.batch.describe(), "infill_mode": self.infill_mode,
                "max_length": self.max_length}

    # ---- tokenisation -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, request: LoglikelihoodRequest) -> tuple[list[int], list[int]]:
        """lm-eval's split (or the request's separately encoded segments); an empty context becomes
        the prefix token, as in lm-eval."""
        if request.segments:
            context_ids, continuation_ids = encode_segments(self.encode, request.context, request.segments)
        else:
            context_ids, continuation_ids = split_pair(self.encode, request.context, request.continuation)
        return context_ids or [self.prefix_token], continuation_ids

    # ---- log-likelihood -----------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        rows = self.pack([self.encode_pair(r) for r in requests])
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        rows.sort(key=lambda row: -row.length)
        for index, logprob, greedy, n in self.batch.run(rows, self.score_rows, weight=lambda row: len(row.branches)):
            results[index] = LoglikelihoodResult(logprob=logprob, is_greedy=greedy, n_tokens=n)
        return results  # type: ignore[return-value]

    def pack(self, pairs: list[tuple[list[int], list[int]]]) -> list[PackedRow]:
        """Group continuations by identical context; truncate from the left like lm-eval."""
        rows: dict[tuple[int, ...], PackedRow] = {}
        singles: list[PackedRow] = []
        for index, (context, continuation) in enumerate(pairs):
            if len(context) + len(continuation) > self.max_length + 1:
                keep = (context + continuation)[-(self.max_length + 1):]
                context, continuation = keep[:-len(continuation)], continuation
                singles.append(PackedRow(context, [(index, continuation)]))
                continue
            row = rows.setdefault(tuple(context), PackedRow(context, []))
            if row.length + len(continuation) > self.max_length + 1:
                singles.append(PackedRow(context, [(index, continuation)]))
            else:
                row.branches.append((index, continuation))
        return [r for r in rows.values() if r.branches] + singles

    @torch.no_grad()
    def score_rows(self, rows: list[PackedRow]) -> list[tuple[int, float, bool, int]]:
        """(request index, logprob, is_greedy, n_tokens) for every branch of every row."""
        layouts = []
        for row in rows:
            # The model reads the context and each branch but the branch's last token; the
            # prediction for a branch's token j sits at its predecessor's position.
            tokens, positions, owner = list(row.context), list(range(len(row.context))), [-1] * len(row.context)
            targets = []
            for b, (index, cont) in enumerate(row.branches):
                start = len(tokens)
                tokens += cont[:-1]
                positions += range(len(row.context), len(row.context) + len(cont) - 1)
                owner += [b] * (len(cont) - 1)
                predictors = [len(row.context) - 1] + list(range(start, start + len(cont) - 1))
                targets.append((index, predictors, cont))
            layouts.append((tokens, positions, owner, targets))
        width = max(len(t) for t, *_ in layouts)
        batch = len(layouts)
        input_ids = torch.full((batch, width), self.prefix_token or 0, dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        allowed = torch.zeros((batch, width, width), dtype=torch.bool)
        for i, (tokens, positions, owner, _) in enumerate(layouts):
            n = len(tokens)
            input_ids[i, :n] = torch.tensor(tokens)
            position_ids[i, :n] = torch.tensor(positions)
            own = torch.tensor(owner)
            causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
            same_branch = (own[:, None] == own[None, :]) | (own[None, :] == -1)
            allowed[i, :n, :n] = causal & same_branch
            allowed[i, n:, 0] = True  # padding queries look at one key, so no row is empty
        hidden = self.hidden_states(input_ids, position_ids, allowed)
        # One head matmul over every scored position of the batch, then split per branch.
        rows_at, positions_at, target_ids, spans = [], [], [], []
        for i, (_, _, _, targets) in enumerate(layouts):
            for index, predictors, cont in targets:
                spans.append((index, len(cont)))
                rows_at += [i] * len(cont)
                positions_at += predictors
                target_ids += cont
        logprobs = torch.log_softmax(self.head(hidden[rows_at, positions_at]).float(), dim=-1)
        target = torch.tensor(target_ids, device=logprobs.device)
        picked = logprobs.gather(-1, target[:, None]).squeeze(-1).tolist()
        hits = (logprobs.argmax(-1) == target).tolist()
        scored, offset = [], 0
        for index, n in spans:
            scored.append((index, float(sum(picked[offset:offset + n])), all(hits[offset:offset + n]), n))
            offset += n
        return scored

    def hidden_states(self, input_ids, position_ids, allowed):
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        out = self.model.base_model(input_ids=input_ids.to(self.device), attention_mask=mask[:, None].to(self.device),
                                    position_ids=position_ids.to(self.device), use_cache=False)
        return out.last_hidden_state

    def head(self, hidden):
        return self.model.get_output_embeddings()(hidden)

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[RollingResult]:
        """Exact log-likelihood of whole texts in disjoint windows (lm-eval's rolling scheme)."""
        results = []
        for request in requests:
            ids = self.encode(request.text)
            total, tokens = 0.0, 0
            pairs = []
            size = min(request.window or self.max_length, self.max_length)
            for start in range(0, len(ids), size):
                window = ids[start:start + size]
                context = ids[max(0, start - 1):start] if start else [self.prefix_token]
                pairs.append((context, window))
            rows = [PackedRow(c, [(i, w)]) for i, (c, w) in enumerate(pairs)]
            for _, logprob, _, n in self.batch.run(rows, self.score_rows, weight=lambda row: 1):
                total, tokens = total + logprob, tokens + n
            results.append(RollingResult(logprob=total, n_tokens=tokens, exact=True))
        return results

    # ---- generation ---------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerationResult]:
        """Greedy decoding; of a request's gen_kwargs only ``max_input_tokens`` applies (the sampler
        settings are the diffusion samplers')."""
        jobs = [GenerationJob(i, self.encode(r.context), token_budget(r.max_tokens, r.reference, self.encode),
                              tuple(r.until), exact=False, max_input=r.gen_kwargs.get("max_input_tokens"))
                for i, r in enumerate(requests)]
        return self._run_jobs(jobs)

    def infill(self, requests: Sequence[InfillRequest]) -> list[GenerationResult]:
        """AR infilling: the prefix alone, or lm-eval's suffix-then-prefix re-ordering."""
        jobs = []
        for i, r in enumerate(requests):
            context = r.prefix if self.infill_mode == "prefix" else f"{r.suffix}\n\n{r.prefix}"
            jobs.append(GenerationJob(i, self.encode(context), token_budget(r.n_tokens, r.reference, self.encode),
                                      (), exact=True, max_input=r.gen_kwargs.get("max_input_tokens")))
        results = self._run_jobs(jobs)
        for result in results:
            result.extra["infill_mode"] = self.infill_mode
        return results

    def _run_jobs(self, jobs: list["GenerationJob"]) -> list[GenerationResult]:
        """Greedy decoding in left-padded batches of jobs with the same stop settings, similar lengths;
        a job over its ``max_input`` tokens (context and budget) is skipped with an empty result."""
        results: list[GenerationResult | None] = [None] * len(jobs)
        groups: dict[tuple, list[GenerationJob]] = {}
        for job in jobs:
            size = len(job.ids) + job.max_tokens
            if job.max_input is not None and size > job.max_input:
                results[job.index] = GenerationResult(text="", n_tokens=0, nfe=0,
                                                      extra={"skipped": f"{size} tokens > {job.max_input}"})
                continue
            groups.setdefault((job.until, job.exact), []).append(job)
        for group in groups.values():
            group.sort(key=lambda job: (-job.max_tokens, -len(job.ids)))
            for index, result in self.batch.run(group, self._generate_batch):
                results[index] = result
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _generate_batch(self, jobs: list["GenerationJob"]) -> list[tuple[int, GenerationResult]]:
        """Each row keeps the first ``max_tokens`` of the batch's greedy continuation, which is what
        decoding it alone gives (rows are independent, up to float rounding from the padding).
        Finished rows are filled with EOS, which ends them."""
        budget = max(job.max_tokens for job in jobs)
        contexts = [self.fit(job.ids or [self.prefix_token], budget) for job in jobs]
        width = max(len(ids) for ids in contexts)
        eos = self.tokenizer.eos_token_id
        pad = eos if eos is not None else self.tokenizer.pad_token_id
        input_ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, ids in enumerate(contexts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        until, exact = jobs[0].until, jobs[0].exact
        kwargs: dict[str, Any] = dict(max_new_tokens=budget, do_sample=False, pad_token_id=pad,
                                      attention_mask=attention_mask.to(self.device))
        if exact:
            kwargs["min_new_tokens"] = budget
        if until:
            kwargs["stop_strings"], kwargs["tokenizer"] = list(until), self.tokenizer
        start = time.perf_counter()
        outputs = self.model.generate(input_ids.to(self.device), **kwargs)[:, width:].tolist()
        latency = time.perf_counter() - start
        done = []
        for job, output in zip(jobs, outputs):
            output = output[:job.max_tokens]
            if not exact and eos in output:
                output = output[:output.index(eos)]
            text = truncate_at_stops(self.tokenizer.decode(output, skip_special_tokens=True), until)
            done.append((job.index, GenerationResult(text=text, n_tokens=len(output), nfe=len(output),
                                                     latency_s=latency, extra={"batch_rows": len(jobs)})))
        return done

    def fit(self, ids: list[int], max_tokens: int) -> list[int]:
        """Keep the context's tail so that it and ``max_tokens`` new tokens fit the model."""
        return ids[-(self.max_length - max_tokens):] if max_tokens < self.max_length else ids[-1:]


@dataclass
class GenerationJob:
    index: int
    ids: list[int]
    max_tokens: int
    until: tuple[str, ...]
    exact: bool
    max_input: int | None = None
