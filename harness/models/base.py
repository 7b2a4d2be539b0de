"""The scorer interface: every backend (AR or diffusion) answers these three kinds of request.

It follows lm-eval's ``LM`` API where it fits: ``loglikelihood`` takes (context, continuation)
pairs and returns (logprob, is_greedy); ``generate_until`` is ``generate`` here and ``infill``
is new (prefix, suffix, number of tokens to fill).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` given ``context``. ``group`` ties the choices of one question."""

    context: str
    continuation: str
    group: str = ""
    # Non-empty: the context is encoded alone and each segment alone, then concatenated (the
    # DiffuGPT/DiffuLLaMA scripts' tokenisation); empty: lm-eval's split of the concatenation.
    segments: tuple[str, ...] = ()


@dataclass
class LoglikelihoodResult:
    logprob: float
    is_greedy: bool
    n_tokens: int
    stderr: float | None = None  # Monte Carlo estimators report one; exact scorers leave None


@dataclass(frozen=True)
class RollingRequest:
    """Score a whole text (perplexity) in disjoint windows of ``window`` tokens (None: the model's
    context), each conditioned on the token before it; exact for AR models, a bound for DLMs."""

    text: str
    window: int | None = None


@dataclass
class RollingResult:
    logprob: float
    n_tokens: int
    exact: bool  # False where the value is a bound (a diffusion ELBO)
    stderr: float | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """Continue ``context``; with a ``reference`` the budget is its token count plus ``max_tokens``."""

    context: str
    max_tokens: int
    until: tuple[str, ...] = ()
    reference: str | tuple[str, ...] | None = None  # oracle length: the backend counts its tokens
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # per-task sampler settings (GEN_KWARGS)


@dataclass(frozen=True)
class InfillRequest:
    """Fill ``n_tokens`` between prefix and suffix; with a ``reference``, its token count plus ``n_tokens``."""

    prefix: str
    suffix: str
    n_tokens: int
    reference: str | tuple[str, ...] | None = None  # oracle length: the backend counts its tokens
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # per-task sampler settings (GEN_KWARGS)


@dataclass
class GenerationResult:
    text: str
    n_tokens: int  # generated, non-padding tokens
    nfe: int  # forward passes spent
    latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class LanguageModel(ABC):
    """One backend behind one interface. ``fingerprint`` says what produced a number."""

    name: str = "model"
    is_diffusion: bool = False
    seed: int = 1234  # the runner sets it; stochastic scorers derive per-request seeds from it
    tokenizer: Any = None  # a Hugging Face tokenizer, where the backend has one (chat templates)

    def chat_template(self, name: str = "default") -> str:
        """The text of the tokenizer's chat template (``name``: one of its named templates)."""
        from harness.errors import HarnessError

        templates = getattr(self.tokenizer, "chat_template", None)
        if not templates:
            raise HarnessError(f"--apply_chat_template: the tokenizer of '{self.name}' has no chat template")
        if isinstance(templates, dict):
            if name not in templates:
                raise HarnessError(f"--apply_chat_template {name}: the tokenizer of '{self.name}' has the "
                                   f"templates {', '.join(sorted(templates))}")
            return templates[name]
        if name != "default":
            raise HarnessError(f"--apply_chat_template {name}: the tokenizer of '{self.name}' has one unnamed template")
        return templates

    def render_chat(self, messages: list[dict[str, str]], template: str = "default",
                    add_generation_prompt: bool = True) -> str:
        """``messages`` rendered by the chat template, with the generation prompt, or else with the
        last (assistant) message left open (lm-eval's ``apply_chat_template``: a template that rejects
        the system role is retried without it)."""
        import jinja2

        options = dict(chat_template=self.chat_template(template), tokenize=False,
                       add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(messages, **options)
        except jinja2.exceptions.TemplateError:
            return self.tokenizer.apply_chat_template([m for m in messages if m["role"] != "system"], **options)

    @property
    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """Weights, dtype, device, batch size and estimator/sampler settings, JSON-serialisable."""

    @abstractmethod
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        ...

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[RollingResult]:
        raise NotImplementedError(f"{type(self).__name__} does not score whole texts")

    @abstractmethod
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerationResult]:
        ...

    @abstractmethod
    def infill(self, requests: Sequence[InfillRequest]) -> list[GenerationResult]:
        ...


def token_budget(tokens: int, reference: str | tuple[str, ...] | None, encode: Callable[[str], list[int]]) -> int:
    """Tokens a request may produce: ``tokens``, plus the reference's token count when it has one
    (several references: the longest in tokens, as the DiffuGPT scripts count)."""
    if reference is None:
        return tokens
    references = (reference,) if isinstance(reference, str) else reference
    return tokens + max(len(encode(r)) for r in references)


def split_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's tokenisation of a pair: trailing spaces of the context move to the continuation,
    which is the tail of the encoded concatenation (the context may come back empty)."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [], encode(continuation)
    context_ids = encode(context)
    return context_ids, encode(context + continuation)[len(context_ids):]


# Keys a task may set in a request's ``gen_kwargs``. Diffusion samplers read ``steps``,
# ``temperature`` and ``top_p`` over the model's own settings; ``max_input_tokens`` skips a request
# whose prompt and fill exceed it (the result is empty, with ``extra["skipped"]``); ``stages`` > 1
# decodes again after the decoded text of the previous stage (SMDM's two-stage GSM8K);
# ``canvas_length`` makes the fill what remains of a canvas of that many tokens after the prompt
# (SMDM's ``context_length``), at every stage.
GEN_KWARGS = ("steps", "temperature", "top_p", "max_input_tokens", "stages", "canvas_length")


def encode_segments(encode, context: str, segments: Sequence[str]) -> tuple[list[int], list[int]]:
    """The context and each continuation segment encoded alone, the segments concatenated."""
    return encode(context) if context else [], [token for segment in segments for token in encode(segment)]


def truncate_at_stops(text: str, until: Sequence[str]) -> str:
    """Cut ``text`` at the first stop sequence it contains."""
    cut = len(text)
    for stop in until:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]
