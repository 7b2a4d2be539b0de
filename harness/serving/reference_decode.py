"""The reference server's model side: one prompt's decoding over a Hugging Face causal LM, token by
token on its key/value cache, with float32 log-probabilities, sampling and stop strings.

Reported log-probabilities are the model's own distribution (``log_softmax`` of the logits in
float32), before temperature, top-p or the EOS ban of ``min_tokens``, as vLLM reports them.

Text pieces: a token's text is what it adds to the decoded sequence, ``decode(ids[:i+1])`` past
``decode(ids[:i])``. A token that ends inside a multi-byte character adds nothing (its decode ends
with U+FFFD) and the token that completes the character carries all of it, so the pieces always
concatenate to the text and cumulative piece lengths (``text_offset``) slice it exactly. The echoed
prompt is a text prompt as written when its pieces spell it, with special tokens or else without
them (a BOS the tokenizer added then adds no text, as in vLLM), otherwise the detokenised ids (a
token-id prompt: with special tokens). Generated pieces skip special tokens, so an EOS adds no text.
Generated text is decoded after the last few prompt tokens, so a leading space survives.
"""
from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from harness.models.diffusion.attention import cache_argument

CONTEXT_TOKENS = 4  # prompt tokens decoded before the generated ones
REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Sampling:
    """What one request asks of generation."""

    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS is banned until this many tokens are generated
    logprobs: int | None = None  # alternatives kept per generated token
    prompt_top: int | None = None  # alternatives kept per prompt token; None: prompt not scored


@dataclass
class Scored:
    """A token with its log-probability, its rank (1: the most likely) and the top alternatives."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


def finite(value: float) -> float:
    """JSON has no infinities: -inf becomes -9999.0, as vLLM writes it."""
    return value if math.isfinite(value) else -9999.0


def score_rows(rows: torch.Tensor, tokens: Sequence[int], k: int) -> list[Scored]:
    """Each token's entry in its row of float32 log-probabilities [N, V], with the ``k`` best."""
    targets = torch.tensor(list(tokens), dtype=torch.long, device=rows.device)
    chosen = rows.gather(1, targets[:, None])[:, 0]
    ranks = ((rows > chosen[:, None]).sum(1) + 1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in ranks]
    if k > 0:
        values, ids = rows.topk(min(k, rows.shape[1]), dim=-1)
        tops = [[(i, finite(v)) for i, v in zip(row_ids, row_values)]
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [Scored(int(t), finite(c), r, top) for t, c, r, top in zip(targets.tolist(), chosen.tolist(), ranks, tops)]


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` restricted to the smallest most-likely set whose mass reaches ``top_p``."""
    ordered, order = probs.sort(descending=True)
    outside = ordered.cumsum(-1) - ordered >= top_p
    ordered[outside] = 0.0
    return torch.zeros_like(probs).scatter(-1, order, ordered)


def max_model_len(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return 2048


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokenizer's EOS, plus the generation config's when it was read from a file."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None)
    if config is not None and not getattr(config, "_from_model_config", True):
        extra = config.eos_token_id
        ids.update(extra if isinstance(extra, (list, tuple)) else [] if extra is None else [extra])
    return frozenset(ids)


class Decoder:
    """One model and tokenizer; every forward pass holds ``lock``, so requests interleave by token."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()
        self.device = next(model.parameters()).device
        self.cache_name = cache_argument(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.eos = eos_ids(model, tokenizer)
        self.max_model_len = max_model_len(model.config)
        self.vocab_size = int(getattr(model.config, "vocab_size", None) or len(tokenizer))

    def forward(self, ids: Sequence[int], cache: Any = None, all_logits: bool = False) -> tuple[torch.Tensor, Any]:
        """float32 log-probabilities [N, V] (only the last row unless ``all_logits``) and the cache."""
        kwargs = {self.cache_name: cache} if cache is not None else {}
        if self.keeps_logits:
            kwargs["logits_to_keep"] = 0 if all_logits else 1
        tensor = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        with self.lock, torch.inference_mode():
            out = self.model(input_ids=tensor, use_cache=True, **kwargs)
        new_cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[0].float().log_softmax(-1), new_cache

    def choose(self, logprobs: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
               ban_eos: bool) -> int:
        scores = logprobs
        if ban_eos and self.eos:
            scores = logprobs.clone()
            scores[list(self.eos)] = -math.inf
        if sampling.temperature <= 0:
            return int(scores.argmax())
        probs = (scores / sampling.temperature).softmax(-1)
        if sampling.top_p < 1:
            probs = nucleus(probs, sampling.top_p)
        return int(torch.multinomial(probs, 1, generator=generator))

    def token_text(self, token: int) -> str:
        return self.decode([token], skip_special=False)

    def decode(self, ids: Sequence[int], skip_special: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


class TextPieces:
    """Incremental detokenisation: ``push`` returns the text a token adds (see the module doc)."""

    def __init__(self, decoder: Decoder, *, context: Sequence[int] = (), skip_special: bool) -> None:
        self.decoder, self.skip_special = decoder, skip_special
        self.context = list(context)[-CONTEXT_TOKENS:]
        self.base = decoder.decode(self.context, skip_special)
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self.release(hold_incomplete=True)

    def flush(self) -> str:
        """What an unfinished character held back, at the end of the sequence."""
        return self.release(hold_incomplete=False)

    def release(self, hold_incomplete: bool) -> str:
        full = self.decoder.decode(self.context + self.ids, self.skip_special)
        if hold_incomplete and full.endswith(REPLACEMENT):
            return ""
        new = full[len(self.base):] if full.startswith(self.base) else self.decoder.decode(self.ids, self.skip_special)
        piece = new[len(self.text):]
        self.text += piece
        return piece


def prompt_pieces(decoder: Decoder, ids: Sequence[int], text: str | None = None) -> list[str]:
    """Each prompt token's text piece; they concatenate to the echoed prompt (see the module doc)."""
    options = [pieces_of(decoder, ids, skip_special=False)]
    if text is not None and "".join(options[0]) != text:
        options.append(pieces_of(decoder, ids, skip_special=True))
    return next((pieces for pieces in options if "".join(pieces) == text), options[0])


def pieces_of(decoder: Decoder, ids: Sequence[int], skip_special: bool) -> list[str]:
    pieces = TextPieces(decoder, skip_special=skip_special)
    out = [pieces.push(token) for token in ids]
    if out:
        out[-1] += pieces.flush()
    return out


class StopText:
    """The generated text, releasing only what cannot turn out to begin a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text, self.sent = "", 0

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text now safe to send, and whether a stop string cut the text."""
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return self.flush(), True
        unsent = self.text[self.sent:]
        hold = max((k for s in self.stops for k in range(1, min(len(s) - 1, len(unsent)) + 1)
                    if unsent.endswith(s[:k])), default=0)
        out = unsent[:len(unsent) - hold]
        self.sent += len(out)
        return out, False

    def flush(self) -> str:
        out = self.text[self.sent:]
        self.sent = len(self.text)
        return out


class Generation:
    """One prompt's decoding. ``start`` runs the prompt and ``step`` adds one token (both block on
    the model: run them in a worker thread); ``step`` returns the text it releases and sets
    ``finish_reason`` ("stop" or "length") on the last token."""

    def __init__(self, decoder: Decoder, prompt: Sequence[int], sampling: Sampling, text: str | None = None) -> None:
        self.decoder, self.prompt, self.sampling = decoder, list(prompt), sampling
        self.prompt_text = text  # the prompt as the request wrote it, when it is text
        self.generator = None
        if sampling.temperature > 0:
            self.generator = torch.Generator(device=decoder.device).manual_seed(sampling.seed)
        self.tokens: list[Scored] = []
        self.pieces: list[str] = []  # each generated token's text piece
        self.prompt_scores: list[Scored] | None = None  # prompt tokens 1.. (token 0 has no score)
        self.finish_reason: str | None = None
        self.text_pieces = TextPieces(decoder, context=self.prompt, skip_special=True)
        self.stop = StopText(sampling.stop)
        self.logprobs: torch.Tensor | None = None
        self.cache: Any = None

    @property
    def text(self) -> str:
        return self.stop.text

    def start(self) -> None:
        top = self.sampling.prompt_top
        logprobs, self.cache = self.decoder.forward(self.prompt, all_logits=top is not None)
        if top is not None:
            self.prompt_scores = score_rows(logprobs[:-1], self.prompt[1:], top)
        self.logprobs = logprobs[-1]
        if self.sampling.max_tokens == 0:
            self.finish_reason = "length"

    def step(self) -> str:
        sampling, decoder = self.sampling, self.decoder
        if self.tokens:
            logprobs, self.cache = decoder.forward([self.tokens[-1].token], self.cache)
            self.logprobs = logprobs[-1]
        ban_eos = len(self.tokens) < sampling.min_tokens
        token = decoder.choose(self.logprobs, sampling, self.generator, ban_eos)
        self.tokens.append(score_rows(self.logprobs[None], [token], sampling.logprobs or 0)[0])
        piece = self.text_pieces.push(token)
        ended_by_eos = token in decoder.eos and not sampling.ignore_eos
        if ended_by_eos or len(self.tokens) >= sampling.max_tokens:
            self.finish_reason = "stop" if ended_by_eos else "length"
            piece += self.text_pieces.flush()
        self.pieces.append(piece)
        out, stopped = self.stop.feed(piece)
        if stopped:
            self.finish_reason = "stop"
        elif self.finish_reason:
            out += self.stop.flush()
        return out


# ---- the OpenAI and vLLM shapes of the results -------------------------------------------------
def completion_choice(decoder: Decoder, index: int, generation: Generation, echo: bool, logprobs: int | None,
                      prompt_logprobs: int | None) -> dict:
    """One choice of a completion: the text (after the echoed prompt), legacy logprobs, vLLM's prompt_logprobs."""
    pieces = prompt_pieces(decoder, generation.prompt, generation.prompt_text) if echo else []
    text = "".join(pieces) + generation.text
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}
    if logprobs is not None:
        scores = [None, *generation.prompt_scores] if echo else []
        entries = [*zip(pieces, scores), *zip(generation.pieces, generation.tokens)]
        choice["logprobs"] = legacy_logprobs(decoder, entries, text, logprobs)
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = [None] + [vllm_entry(decoder, s, prompt_logprobs)
                                             for s in generation.prompt_scores]
    return choice


def legacy_logprobs(decoder: Decoder, entries: list, text: str, k: int) -> dict:
    """OpenAI's legacy logprobs; token strings are the text pieces (the module doc), clipped
    to a text a stop string cut, so ``text[offset_i:offset_{i+1}]`` is token i's string. The
    ``top_logprobs`` keys are each token decoded alone."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    position = 0
    for piece, scored in entries:
        start, position = min(position, len(text)), position + len(piece)
        out["tokens"].append(text[start:min(position, len(text))])
        out["text_offset"].append(start)
        out["token_logprobs"].append(None if scored is None else scored.logprob)
        if scored is None:
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for token, logprob in [*scored.top[:k], (scored.token, scored.logprob)]:
            top.setdefault(decoder.token_text(token), logprob)  # tokens that decode alike: the likeliest
        out["top_logprobs"].append(top)
    return out


def vllm_entry(decoder: Decoder, scored: Scored, k: int) -> dict:
    """One prompt token in vLLM's ``prompt_logprobs``: the token and the ``k`` most likely."""
    entry = {str(token): {"logprob": logprob, "rank": rank, "decoded_token": decoder.token_text(token)}
             for rank, (token, logprob) in enumerate(scored.top[:k], start=1)}
    entry[str(scored.token)] = {"logprob": scored.logprob, "rank": scored.rank,
                                "decoded_token": decoder.token_text(scored.token)}
    return entry


def usage(generations: list[Generation]) -> dict:
    prompt = sum(len(g.prompt) for g in generations)
    completion = sum(len(g.tokens) for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def text_chunk(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_chunk(delta: str | dict, finish_reason: str | None) -> dict:
    content = delta if isinstance(delta, dict) else {"content": delta}
    return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
