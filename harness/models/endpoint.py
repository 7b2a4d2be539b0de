"""A served model behind the scorer interface: any OpenAI-compatible endpoint (vLLM, SGLang,
dInfer, the harness's reference server), ``--model openai:URL`` or a card with ``backend: endpoint``.

* ``generate``: the completions API, or the chat-completions API for prompts laid out under
  ``--apply_chat_template`` (the server renders its own template: the task's messages travel as
  ``{"chat_messages": [...]}``, as lm-eval's API models pass a chat history). Greedy (temperature
  0) unless the task's ``gen_kwargs`` set ``temperature``/``top_p``; the stop sequences go to the
  server and are cut again here; ``max_input_tokens`` skips as the local backends do.
* ``infill``: the prefix alone, the suffix then the prefix (``infill_mode``, as the AR backend), or
  the completions API's ``suffix``; exactly the budget of tokens (``min_tokens``, ``ignore_eos``).
* ``loglikelihood`` and ``loglikelihood_rolling`` (perplexity, with a local tokenizer for the start
  token): the prompt log-probabilities the server returns (``harness.models.endpoint_logprobs``).

Token ids: with a tokenizer (``tokenizer=``, else the server's ``/tokenize`` where it has one)
prompts are sent as token ids encoded without special tokens, cut to the server's context from the
left, exactly as the local AR backend feeds its model, and pairs are split as lm-eval splits them;
without one, prompts are text and a reference-length budget cannot be counted. The requests of one
call run ``num_concurrent`` at a time; a failed one (after the client's retries) fails the batch,
so nothing of it is stored and the same command later resumes it.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

from harness.errors import HarnessError
from harness.models.base import (GenerateRequest, GenerationResult, InfillRequest, LanguageModel,
                                 LoglikelihoodRequest, LoglikelihoodResult, RollingRequest, RollingResult,
                                 token_budget, truncate_at_stops)
from harness.models.settings import EndpointSettings
from harness.serving.client import EndpointError
from harness.serving.server_info import connect

CHAT_KEY = "chat_messages"
SAMPLING_KWARGS = ("temperature", "top_p")


def chat_messages(context: str) -> list[dict[str, str]] | None:
    """The chat history a context carries (``render_chat``'s form), or None for a plain prompt."""
    if not context.startswith('{"' + CHAT_KEY):
        return None
    try:
        messages = json.loads(context)[CHAT_KEY]
    except (ValueError, KeyError, TypeError):
        return None
    return messages if isinstance(messages, list) else None


def public_url(url: str) -> str:
    """The URL without any user:password part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class EndpointLM(LanguageModel):
    """An OpenAI-compatible endpoint; ``settings`` are ``EndpointSettings``."""

    def __init__(self, settings: EndpointSettings, *, batch_size: int | str = 16):
        self.settings = settings
        self.endpoint, self.server = connect(settings)
        self.model = self.server["model"]
        self.name = self.model
        self.is_diffusion = settings.family == "diffusion"
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(settings.tokenizer) if settings.tokenizer else None
        self.token_source = "tokenizer" if self.tokenizer is not None else ("server" if self.server_tokenizes() else None)
        self.logprobs_mode = None if settings.logprobs == "auto" else settings.logprobs

    @property
    def fingerprint(self) -> dict[str, Any]:
        server = {k: self.server[k] for k in ("engine", "version", "model", "root", "max_model_len", "dtype")}
        return {"name": self.model, "backend": "endpoint", "engine": self.server["engine"], "served": True,
                "endpoint": public_url(self.settings.base_url), "model": self.model, "server": server,
                "server_hardware": self.server["hardware"], "family": self.settings.family,
                "tokenizer": self.settings.tokenizer, "token_source": self.token_source,
                "logprobs": self.settings.logprobs, "infill_mode": self.settings.infill_mode,
                "dtype": self.server["dtype"] or "served", "batch_size": self.batch_size}

    # ---- chat ----------------------------------------------------------------------------------
    def chat_template(self, name: str = "default") -> str:
        """A served model's chat template is the server's own."""
        if name != "default":
            raise HarnessError(f"--apply_chat_template {name}: a served model uses the server's chat template; "
                               f"give no template name")
        return f"(the chat template of {self.model} as served by {self.server['engine']} {self.server['version'] or ''})".replace(" )", ")")

    def render_chat(self, messages: list[dict[str, str]], template: str = "default",
                    add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise HarnessError("a served chat model cannot continue an assistant message")
        return json.dumps({CHAT_KEY: messages}, ensure_ascii=False)

    # ---- tokens --------------------------------------------------------------------------------
    def server_tokenizes(self) -> bool:
        try:
            self.server_tokens("a")
        except EndpointError:
            return False
        return True

    def server_tokens(self, text: str) -> list[int]:
        """The server's ``/tokenize`` of ``text`` without special tokens (vLLM's route)."""
        tokens = self.endpoint.post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False},
                                    root=True).get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise EndpointError(f"endpoint {self.settings.base_url}: /tokenize answered without token ids")
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens (the local tokenizer's, else the server's)."""
        if self.tokenizer is not None:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.token_source is None:
            raise HarnessError(f"counting tokens needs a tokenizer: {self.settings.base_url} has no /tokenize; "
                               f"give --model_args tokenizer=DIR_OR_HUB_ID")
        return self.server_tokens(text)

    def prompt(self, text: str, budget: int) -> str | list[int]:
        """The prompt as token ids cut to fit ``budget`` new tokens (text without a tokenizer)."""
        if self.token_source is None:
            return text
        ids = self.encode(text) or self.start_ids()
        limit = self.server["max_model_len"]
        return ids[-(limit - budget):] if limit and 0 < budget < limit and len(ids) + budget > limit else ids

    def start_ids(self) -> list[int]:
        """What an empty prompt becomes: the tokenizer's BOS (else EOS), as the AR backend."""
        token = None if self.tokenizer is None else (self.tokenizer.bos_token_id if self.tokenizer.bos_token_id
                                                     is not None else self.tokenizer.eos_token_id)
        if token is None:
            raise HarnessError("an empty prompt needs the model's start token: give --model_args tokenizer=DIR_OR_HUB_ID")
        return [token]

    # ---- requests ------------------------------------------------------------------------------
    def concurrently(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``fn`` over ``items``, ``num_concurrent`` at a time, in order; the first failure is raised
        once the requests in flight have ended (those not started are dropped)."""
        workers = min(self.settings.num_concurrent, len(items))
        if workers <= 1:
            return [fn(item) for item in items]
        pool = ThreadPoolExecutor(workers)
        try:
            return list(pool.map(fn, items))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def complete(self, prompt: str | list[int] | list[dict[str, str]], budget: int, *, until: Sequence[str] = (),
                 exact: bool = False, sampling: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> GenerationResult:
        """One completion (``prompt`` a chat history: a chat completion) of at most ``budget`` tokens."""
        chat = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)
        payload: dict[str, Any] = {"model": self.model, "max_tokens": budget, "temperature": 0.0, "seed": self.seed,
                                   **(sampling or {}), **(extra or {})}
        payload["messages" if chat else "prompt"] = prompt
        if until:
            payload["stop"] = list(until)
        if exact:
            payload.update(min_tokens=budget, ignore_eos=True)
        start = time.perf_counter()
        answer = self.endpoint.post("chat/completions" if chat else "completions", payload)
        latency = time.perf_counter() - start
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            tokens = (answer.get("usage") or {}).get("completion_tokens")
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"endpoint {self.settings.base_url}: a completion without choices[0] text") from None
        if not isinstance(text, str):
            raise EndpointError(f"endpoint {self.settings.base_url}: a completion whose text is not a string")
        tokens = tokens if isinstance(tokens, int) and tokens >= 0 else None
        return GenerationResult(text=truncate_at_stops(text, until), n_tokens=tokens if tokens is not None else 0,
                                nfe=0, latency_s=latency,
                                extra={"finish_reason": choice.get("finish_reason"), "served": self.server["engine"],
                                       **({} if tokens is not None else {"n_tokens": "not reported"})})

    def too_long(self, prompt: str | list[int] | list[dict[str, str]], budget: int,
                 max_input: int | None) -> GenerationResult | None:
        """The skipped result of a request over its ``max_input_tokens`` (token ids known), else None."""
        if max_input is None or not prompt or not isinstance(prompt[0], int):
            return None
        size = len(prompt) + budget
        return GenerationResult(text="", n_tokens=0, nfe=0, extra={"skipped": f"{size} tokens > {max_input}"}) \
            if size > max_input else None

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerationResult]:
        def one(r: GenerateRequest) -> GenerationResult:
            budget = token_budget(r.max_tokens, r.reference, self.encode)
            messages = chat_messages(r.context)
            prompt = messages if messages is not None else self.prompt(r.context, budget)
            sampling = {k: r.gen_kwargs[k] for k in SAMPLING_KWARGS if r.gen_kwargs.get(k) is not None}
            return self.too_long(prompt, budget, r.gen_kwargs.get("max_input_tokens")) or \
                self.complete(prompt, budget, until=r.until, sampling=sampling)
        return self.concurrently(one, requests)

    def infill(self, requests: Sequence[InfillRequest]) -> list[GenerationResult]:
        mode = self.settings.infill_mode

        def one(r: InfillRequest) -> GenerationResult:
            budget = token_budget(r.n_tokens, r.reference, self.encode)
            context = r.prefix if mode != "reorder" else f"{r.suffix}\n\n{r.prefix}"
            prompt = self.prompt(context, budget)
            result = self.too_long(prompt, budget, r.gen_kwargs.get("max_input_tokens")) or self.complete(
                prompt, budget, exact=True, extra={"suffix": r.suffix} if mode == "suffix" else None)
            result.extra["infill_mode"] = mode
            return result
        return self.concurrently(one, requests)

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        from harness.models.endpoint_logprobs import score_pair

        for r in requests:
            if chat_messages(r.context) is not None:
                raise HarnessError("log-likelihoods under --apply_chat_template: the chat-completions API scores no "
                                   "given continuation; run the log-likelihood tasks without the chat template")
        return self.concurrently(lambda r: score_pair(self, r), requests)

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[RollingResult]:
        from harness.models.endpoint_logprobs import score_rolling

        return self.concurrently(lambda r: score_rolling(self, r), requests)


def load_tokenizer(source: str):
    """A Hugging Face tokenizer from a directory, a hub id or a model card's weights."""
    import os

    from harness.catalog import catalog
    from harness.models import loading

    models = catalog().models
    return loading.load_tokenizer(loading.resolve_weights(models.get(source).weights) if source in models
                                  else os.path.expanduser(source))
