"""Typed backend settings: every model argument has one default and one validation, here.

``--model-args`` (and a card's ``defaults`` and a suite's ``model_args``) are parsed into these
dataclasses before any weights are loaded, so a bad value is one line and exit code 2 and an
unknown key lists the valid ones. The dataclasses are what the backends keep and what their
fingerprints record.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from harness.errors import HarnessError


def _choice(known: Callable[[], Any]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        names = list(known())
        if value not in names:
            raise HarnessError(f"{name} must be one of {', '.join(map(str, names))}, not {value!r}")
        return value
    return check


def _number(kind: type, low: float | None = None, high: float | None = None, *, optional: bool = False,
            open_low: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and optional:
            return None
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok_type and float(value).is_integer():
            value = int(value)
        elif kind is int or not ok_type:
            word = "an integer" if kind is int else "a number"
            raise HarnessError(f"{name} must be {word}{' or none' if optional else ''}, not {value!r}")
        value = kind(value)
        if low is not None and (value < low or (open_low and value == low)) or high is not None and value > high:
            bounds = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "") \
                if low is not None else f"<= {high}"
            raise HarnessError(f"{name} must be {bounds}, not {value!r}")
        return value
    return check


def _flag(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise HarnessError(f"{name} must be true or false, not {value!r}")
    return value


def _text(name: str, value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise HarnessError(f"{name} must be a string, not {value!r}")
    return value


def _methods():
    from harness.models.diffusion.estimators import METHODS
    return METHODS


def _greedy_checks():
    from harness.models.diffusion.estimators import GREEDY_CHECKS
    return GREEDY_CHECKS


def _samplers():
    from harness.models.diffusion.samplers import SAMPLERS
    return SAMPLERS


def _remasking():
    from harness.models.diffusion.samplers import REMASKING
    return REMASKING


def validated(instance: Any, checks: dict[str, Callable[[str, Any], Any]]) -> None:
    """Check (and normalise) every field of a frozen dataclass instance in place."""
    for f in fields(instance):
        if f.name in checks:
            object.__setattr__(instance, f.name, checks[f.name](f.name, getattr(instance, f.name)))


@dataclass(frozen=True)
class EstimatorSettings:
    """How a diffusion model scores log-likelihoods (``harness.models.diffusion.estimators``)."""

    method: str = "mc_time"
    samples: int = 32
    eps: float = 1e-3
    cfg_scale: float = 0.0
    greedy: str = "parallel"

    def __post_init__(self) -> None:
        validated(self, {"method": _choice(_methods), "samples": _number(int, 1), "eps": _number(float, 0, 0.999999),
                         "cfg_scale": _number(float, 0), "greedy": _choice(_greedy_checks)})


@dataclass(frozen=True)
class SamplerSettings:
    """How a diffusion model generates and infills (``harness.models.diffusion.samplers``).

    ``threshold`` / ``factor``: the ``threshold`` sampler's rules (a factor replaces the threshold);
    ``gamma``: the ``entropy_bounded`` sampler's entropy bound in nats (0.1: the bound DiffusionGemma
    ships, diffusers' ``EntropyBoundScheduler`` default). ``eos_stop``, ``logits_eos_inf`` and
    ``confidence_eos_eot_inf``: the block samplers' EOS options (``samplers.common.EosOptions``),
    off by default, which is each sampler as published; the sampler takes the EOS/EOT ids from the
    backend.
    """

    name: str = "llada"
    steps: int | None = None
    block_length: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    threshold: float = 0.9
    factor: float | None = None
    gamma: float = 0.1
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    eos_stop: bool = False
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False

    def __post_init__(self) -> None:
        validated(self, {"name": _choice(_samplers), "steps": _number(int, 1, optional=True),
                         "block_length": _number(int, 1, optional=True), "temperature": _number(float, 0),
                         "top_p": _number(float, 0, 1, open_low=True), "threshold": _number(float, 0, 1),
                         "factor": _number(float, 0, optional=True, open_low=True), "gamma": _number(float, 0),
                         "remasking": _choice(_remasking), "cfg_scale": _number(float, 0), "eos_stop": _flag,
                         "logits_eos_inf": _flag, "confidence_eos_eot_inf": _flag})


@dataclass(frozen=True)
class CacheSettings:
    """Key/value caching for block decoding (``harness.models.diffusion.cache``): ``none``
    recomputes the whole sequence every step; ``prefix`` (Fast-dLLM) reuses the keys and values of
    everything before the current block; ``dual`` also those after it. ``refresh``: steps between
    full passes (None: only when a row enters a new block; 1: every step, which is ``none``)."""

    mode: str = "none"
    refresh: int | None = None

    def __post_init__(self) -> None:
        validated(self, {"mode": _choice(lambda: CACHE_MODES), "refresh": _number(int, 1, optional=True)})


CACHE_MODES = ("none", "prefix", "dual")
START_TOKENS = ("bos", "none")
LOAD_KEYS = ("format", "mask_id", "tokenizer", "config", "rope_cache_dtype")


@dataclass(frozen=True)
class DiffusionSettings:
    """Everything ``--model-args`` sets on a diffusion model."""

    estimator: EstimatorSettings = field(default_factory=EstimatorSettings)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    start_token: str = "bos"  # bos: the tokenizer's BOS (else EOS) | none (DiffuGPT's GPT-2 contexts)
    base_model: str | None = None
    load: dict[str, Any] = field(default_factory=dict)  # checkpoint loading: LOAD_KEYS

    def __post_init__(self) -> None:
        validated(self, {"start_token": _choice(lambda: START_TOKENS), "base_model": _text})


@dataclass(frozen=True)
class ARSettings:
    """Everything ``--model-args`` sets on an AR model."""

    infill_mode: str = "prefix"  # prefix: the prefix alone | reorder: suffix, then prefix (lm-eval)
    max_length: int | None = None  # None: the model config's context length

    def __post_init__(self) -> None:
        validated(self, {"infill_mode": _choice(lambda: ("prefix", "reorder")),
                         "max_length": _number(int, 1, optional=True)})


@dataclass(frozen=True)
class DiffusionGemmaSettings:
    """Everything ``--model-args`` sets on DiffusionGemma (``harness.models.diffusion_gemma``).

    The sampler settings carry the names the model's own ``generate`` takes; None: the
    checkpoint's ``generation_config.json``, else transformers' defaults. ``chat_template``: wrap
    prompts in the tokenizer's chat template (None: when the tokenizer has one)."""

    chat_template: bool | None = None
    max_denoising_steps: int | None = None
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    stability_threshold: int | None = None
    confidence_threshold: float | None = None
    infill_mode: str = "prefix"  # prefix: the prefix alone | reorder: suffix, then prefix (as the AR backend)
    max_length: int | None = None  # None: the model config's context length

    def __post_init__(self) -> None:
        validated(self, {"chat_template": lambda n, v: v if v is None else _flag(n, v),
                         "max_denoising_steps": _number(int, 1, optional=True),
                         "t_min": _number(float, 0, optional=True), "t_max": _number(float, 0, optional=True),
                         "entropy_bound": _number(float, 0, optional=True, open_low=True),
                         "stability_threshold": _number(int, 0, optional=True),
                         "confidence_threshold": _number(float, 0, optional=True, open_low=True),
                         "infill_mode": _choice(lambda: ("prefix", "reorder")),
                         "max_length": _number(int, 1, optional=True)})
        if self.t_min is not None and self.t_max is not None and self.t_max <= self.t_min:
            raise HarnessError(f"t_max must be > t_min, not {self.t_max!r} <= {self.t_min!r}")


@dataclass(frozen=True)
class EndpointSettings:
    """Everything ``--model-args`` sets on a served model (``harness.models.endpoint``).

    ``base_url``: the API root (``http://host:port/v1``; ``--model openai:URL`` sets it);
    ``model``: the served model's name (None: the server's only model); ``tokenizer``: a local
    tokenizer (directory, hub id or model card) to split and count tokens exactly (None: the
    server's ``/tokenize`` where it has one, else text offsets); ``logprobs``: how prompt
    log-probabilities are asked for (``echo`` with ``logprobs``, vLLM's ``prompt_logprobs``, or
    ``auto``: the first that works); ``infill_mode``: prefix | reorder (as the AR backend) |
    suffix (the completions API's ``suffix``); ``family``: what the server runs (ar | diffusion);
    ``server_hardware``: what it runs on, as the user states it (``8xH20``), where the server
    does not say. The transport settings (``TRANSPORT_ARGS``) change no number and are not part of
    a run's identity; the API key is read from the environment variable ``api_key_env``."""

    base_url: str | None = None
    model: str | None = None
    tokenizer: str | None = None
    logprobs: str = "auto"
    infill_mode: str = "prefix"
    family: str = "ar"
    server_hardware: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    num_concurrent: int = 8
    max_retries: int = 3
    timeout: float = 120.0

    def __post_init__(self) -> None:
        validated(self, {"base_url": _text, "model": _text, "tokenizer": _text, "server_hardware": _text,
                         "logprobs": _choice(lambda: ("auto", "echo", "prompt_logprobs")),
                         "infill_mode": _choice(lambda: ("prefix", "reorder", "suffix")),
                         "family": _choice(lambda: ("ar", "diffusion")), "api_key_env": _text,
                         "num_concurrent": _number(int, 1), "max_retries": _number(int, 0),
                         "timeout": _number(float, 0, open_low=True)})
        if not self.base_url:
            raise HarnessError("an endpoint model needs base_url (--model openai:http://HOST:PORT/v1)")
        from harness.serving.client import check_base_url

        object.__setattr__(self, "base_url", check_base_url(self.base_url))


TRANSPORT_ARGS = ("api_key_env", "num_concurrent", "max_retries", "timeout")


# model argument -> (part of DiffusionSettings, field); cfg_scale goes to both parts
ESTIMATOR_ARGS = {"estimator": "method", "samples": "samples", "eps": "eps", "cfg_scale": "cfg_scale",
                  "greedy": "greedy"}
SAMPLER_ARGS = {"sampler": "name", "steps": "steps", "block_length": "block_length", "temperature": "temperature",
                "top_p": "top_p", "threshold": "threshold", "factor": "factor", "gamma": "gamma",
                "remasking": "remasking", "cfg_scale": "cfg_scale", "eos_stop": "eos_stop",
                "logits_eos_inf": "logits_eos_inf", "confidence_eos_eot_inf": "confidence_eos_eot_inf"}
CACHE_ARGS = {"cache": "mode", "refresh": "refresh"}
DIFFUSION_ARGS = sorted({*ESTIMATOR_ARGS, *SAMPLER_ARGS, *CACHE_ARGS, "start_token", "base_model", *LOAD_KEYS})
AR_ARGS = sorted(f.name for f in fields(ARSettings))
DIFFUSION_GEMMA_ARGS = sorted(f.name for f in fields(DiffusionGemmaSettings))
ENDPOINT_ARGS = sorted(f.name for f in fields(EndpointSettings))


def _reject_unknown(args: dict[str, Any], valid: list[str], family: str) -> None:
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise HarnessError(f"unknown model argument(s) {', '.join(unknown)} for {family} model "
                           f"(valid: {', '.join(valid)})")


def diffusion_settings(args: dict[str, Any]) -> DiffusionSettings:
    """Parse model arguments into validated settings (a HarnessError names the bad key and value)."""
    _reject_unknown(args, DIFFUSION_ARGS, "a diffusion")
    return DiffusionSettings(
        estimator=EstimatorSettings(**{f: args[a] for a, f in ESTIMATOR_ARGS.items() if a in args}),
        sampler=SamplerSettings(**{f: args[a] for a, f in SAMPLER_ARGS.items() if a in args}),
        cache=CacheSettings(**{f: args[a] for a, f in CACHE_ARGS.items() if a in args}),
        start_token=args.get("start_token", "bos"), base_model=args.get("base_model"),
        load={k: args[k] for k in LOAD_KEYS if k in args})


def ar_settings(args: dict[str, Any]) -> ARSettings:
    _reject_unknown(args, AR_ARGS, "an AR")
    return ARSettings(**args)


Settings = DiffusionSettings | ARSettings | DiffusionGemmaSettings | EndpointSettings


def settings_for(backend: str, args: dict[str, Any]) -> Settings:
    if backend == "endpoint":
        _reject_unknown(args, ENDPOINT_ARGS, "an endpoint")
        return EndpointSettings(**args)
    if backend == "diffusion_gemma":
        _reject_unknown(args, DIFFUSION_GEMMA_ARGS, "a DiffusionGemma")
        return DiffusionGemmaSettings(**args)
    return diffusion_settings(args) if backend == "diffusion" else ar_settings(args)
