"""DiffusionGemma (Google's block-diffusion Gemma) through transformers' own classes.

The weights load into ``transformers.DiffusionGemmaForBlockDiffusion`` and text comes from the
model's own ``generate``: a causal encoder reads the prompt into a KV cache, then each canvas of
``canvas_length`` tokens starts as uniform noise and is denoised by the bidirectional decoder
with the entropy-bound sampler, a linear temperature schedule (``t_max`` to ``t_min``),
self-conditioning and adaptive stopping (``stability_threshold``, ``confidence_threshold``), up
to ``max_denoising_steps`` decoder passes a canvas; finished canvases are encoded and the next one
starts. That sampler is the reference and the harness does not reimplement any of it. Its
settings are the model arguments (``harness.models.settings.DiffusionGemmaSettings``, the names
``generate`` takes); unset ones come from the checkpoint's ``generation_config.json``, else
transformers' defaults, and the fingerprint records the values used.

Seeds: ``generate`` draws from torch's global generator, so each request runs alone under
``torch.manual_seed(s)`` inside ``torch.random.fork_rng`` (the caller's generator is left as it
was), with ``s`` derived from the run seed and the request (``seeded_generator``): a result does
not depend on the other requests, their order or a resumed run. ``nfe`` is the decoder passes,
counted by a hook on the decoder; ``extra["tokens_per_forward"]`` is ``generate``'s own figure
(non-padding tokens of every generated canvas / decoder passes). Output is whole canvases: the
tokens past a request's budget are dropped, then everything from the first EOS.

A request's ``gen_kwargs`` apply only for ``max_input_tokens``: ``steps``, ``temperature`` and the
rest are the masked-diffusion samplers' protocols, not this model's. Likelihood requests raise a
HarnessError: the uniform-noise process has no ELBO the harness implements.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from harness.config import ModelCard
from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.models.base import (GenerateRequest, GenerationResult, InfillRequest, LanguageModel,
                                 LoglikelihoodRequest, LoglikelihoodResult, RollingRequest, RollingResult,
                                 token_budget, truncate_at_stops)
from harness.models.batching import parse_batch_size
from harness.models.settings import DiffusionGemmaSettings

MODEL_TYPE = "diffusion_gemma"  # DiffusionGemmaConfig.model_type
SAMPLER_KEYS = ("max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold",
                "confidence_threshold")
LIKELIHOOD_OUTPUTS = ("loglikelihood", "multiple_choice", "loglikelihood_rolling")
NO_ELBO = ("DiffusionGemma's uniform-noise process defines no ELBO the harness implements; likelihood tasks "
           "need an AR or masked-diffusion model")


def is_diffusion_gemma(path: Path) -> bool:
    """A local checkpoint directory whose config.json is a DiffusionGemma config."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def check_tasks(names: Sequence[str]) -> None:
    """Refuse likelihood tasks before any weights load (one line, exit code 2)."""
    from harness.catalog import catalog

    scored = [name for name in names if catalog().task(name, None).output_type in LIKELIHOOD_OUTPUTS]
    if scored:
        raise HarnessError(f"{NO_ELBO} ({', '.join(scored)} score log-likelihoods)")


def request_seed(seed: int, key: str) -> int:
    """The torch seed of one request: a stable hash of the run seed and the request's key."""
    from harness.models.diffusion.estimators import seeded_generator

    return seeded_generator(seed, key).initial_seed()


@contextmanager
def counted_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """``with counted_calls(decoder) as calls``: ``calls[0]`` is the forward calls made inside."""
    calls = [0]
    handle = module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@dataclass
class _Decoded:
    """One ``generate`` call: the new tokens (whole canvases), decoder passes, its tokens per forward."""

    tokens: list[int]
    passes: int
    tokens_per_forward: float
    seed: int
    latency_s: float


class DiffusionGemmaLM(LanguageModel):
    """Generation and infilling by ``DiffusionGemmaForBlockDiffusion.generate``; no likelihoods."""

    is_diffusion = True

    def __init__(self, model, tokenizer, *, name: str, weights: str, dtype: str = "float32", device: str = "cpu",
                 settings: DiffusionGemmaSettings | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.weights, self.dtype, self.device = weights, dtype, device
        self.settings = settings or DiffusionGemmaSettings()
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if self.settings.chat_template and not has_template:
            raise HarnessError(f"chat_template=true, but the tokenizer of '{name}' has no chat template")
        self.wrap_chat = has_template if self.settings.chat_template is None else self.settings.chat_template
        self.canvas_length = int(model.config.canvas_length)
        self.max_length = self.settings.max_length or model.config.get_text_config().max_position_embeddings
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        bos = tokenizer.bos_token_id
        self.prefix_token = bos if bos is not None else tokenizer.eos_token_id
        sampler = self.sampler_settings()
        if sampler["t_max"] <= sampler["t_min"]:
            raise HarnessError(f"t_max must be > t_min, not {sampler['t_max']} <= {sampler['t_min']} "
                               "(unset ones come from the checkpoint's generation config)")

    @classmethod
    def from_card(cls, card: ModelCard, settings: DiffusionGemmaSettings, *, device: str, dtype: str,
                  batch_size: int | str = 1) -> "DiffusionGemmaLM":
        from transformers import DiffusionGemmaForBlockDiffusion

        from harness.models.loading import load_pretrained, resolve_weights

        parse_batch_size(batch_size)  # validated; requests decode one at a time (see the module docstring)
        weights = resolve_weights(card.weights)
        model, tokenizer = load_pretrained(weights, DiffusionGemmaForBlockDiffusion, "DiffusionGemma", dtype=dtype,
                                           device=device)
        return cls(model, tokenizer, name=card.name, weights=weights, dtype=dtype, device=device, settings=settings)

    # ---- settings -------------------------------------------------------------------------------
    def sampler_settings(self, steps: int | None = None) -> dict[str, Any]:
        """The sampler settings ``generate`` runs with: the model arguments (``steps`` over
        ``max_denoising_steps``), else the checkpoint's generation config, else transformers' defaults."""
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

        defaults = DiffusionGemmaGenerationConfig._get_default_generation_params()
        gen = self.model.generation_config
        given = {**asdict(self.settings), **({"max_denoising_steps": steps} if steps is not None else {})}
        out = {}
        for key in SAMPLER_KEYS:
            if key == "entropy_bound":
                stored = getattr(gen.sampler_config, "entropy_bound", None)
                default = defaults["sampler_config"].entropy_bound
            else:
                stored, default = getattr(gen, key, None), defaults[key]
            out[key] = next(v for v in (given[key], stored, default) if v is not None)
        return out

    def generate_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """Keyword arguments for the model's ``generate`` (all but the prompt and the budget)."""
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

        settings = self.sampler_settings(steps)
        bound = EntropyBoundSamplerConfig(entropy_bound=float(settings.pop("entropy_bound")))
        # max_length=None: generate would otherwise read a stored max_length over max_new_tokens=256
        return {**settings, "sampler_config": bound, "eos_token_id": self.eos_ids or None,
                "pad_token_id": self.pad_id, "max_length": None}

    @property
    def fingerprint(self) -> dict[str, Any]:
        sampler = self.sampler_settings()
        return {"backend": "diffusion_gemma", "name": self.name, "weights": self.weights, "dtype": self.dtype,
                "device": self.device, "batch_size": 1, "seed": self.seed, "chat_template": self.wrap_chat,
                "infill_mode": self.settings.infill_mode, "max_length": self.max_length,
                "canvas_length": self.canvas_length, "eos_token_id": self.eos_ids, "pad_token_id": self.pad_id,
                # steps: max_denoising_steps, the most decoder passes a canvas gets
                "sampler": {"name": "entropy_bound", "steps": sampler.pop("max_denoising_steps"), **sampler}}

    # ---- tokenisation ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str, chat: bool) -> list[int]:
        """The prompt as one user turn of the chat template (which adds its own BOS), or the text
        after the tokenizer's BOS (else its EOS)."""
        if chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
            return self.encode(rendered)
        return [self.prefix_token] + self.encode(text)

    def fit(self, ids: list[int], budget: int) -> list[int]:
        """Keep the prompt's tail so that it and the budget's whole canvases fit the model."""
        room = self.max_length - -(-budget // self.canvas_length) * self.canvas_length
        if room < 1:
            raise HarnessError(f"a budget of {budget} tokens does not fit the model's {self.max_length} tokens")
        return ids[-room:]

    # ---- generation and infilling ---------------------------------------------------------------
    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerationResult]:
        """Continue each context (one chat turn when ``chat_template``); stop sequences cut the text."""
        return [self._run(self.prompt_ids(r.context, self.wrap_chat),
                          token_budget(r.max_tokens, r.reference, self.encode), tuple(r.until),
                          stable_hash([r.context, r.max_tokens]), r.gen_kwargs) for r in requests]

    def infill(self, requests: Sequence[InfillRequest]) -> list[GenerationResult]:
        """The fill is generated after the prefix alone (``infill_mode=prefix``) or after the suffix
        and then the prefix (``reorder``, lm-eval's AR scheme), as raw text without the chat
        template: DiffusionGemma decodes its canvases left to right after an encoded prompt and its
        ``generate`` has no way to hold a suffix fixed after the canvas (a starting canvas of
        ``decoder_input_ids`` is renoised wherever the sampler does not accept it)."""
        results = []
        for r in requests:
            context = r.prefix if self.settings.infill_mode == "prefix" else f"{r.suffix}\n\n{r.prefix}"
            result = self._run(self.prompt_ids(context, chat=False), token_budget(r.n_tokens, r.reference, self.encode),
                               (), stable_hash([r.prefix, r.suffix, r.n_tokens]), r.gen_kwargs)
            result.extra["infill_mode"] = self.settings.infill_mode
            results.append(result)
        return results

    def _run(self, ids: list[int], budget: int, until: tuple[str, ...], key: str,
             gen_kwargs: dict[str, Any]) -> GenerationResult:
        """One request: skipped past ``max_input_tokens``, else decoded alone; the budget's first
        tokens up to the first EOS are kept and stop sequences cut the text."""
        limit = gen_kwargs.get("max_input_tokens")
        if limit is not None and len(ids) + budget > limit:
            return GenerationResult(text="", n_tokens=0, nfe=0,
                                    extra={"skipped": f"{len(ids) + budget} tokens > {limit}"})
        decoded = self.decode(self.fit(ids, budget), budget, key)
        tokens = decoded.tokens[:budget]
        ends = [i for i, token in enumerate(tokens) if token in self.eos_ids]
        tokens = tokens[:ends[0]] if ends else tokens
        text = truncate_at_stops(self.tokenizer.decode(tokens, skip_special_tokens=True), until)
        return GenerationResult(text=text, n_tokens=len(tokens), nfe=decoded.passes, latency_s=decoded.latency_s,
                                extra={"tokens_per_forward": decoded.tokens_per_forward, "sampler": "entropy_bound",
                                       "canvas_tokens": len(decoded.tokens), "seed": decoded.seed})

    @torch.no_grad()
    def decode(self, ids: list[int], budget: int, key: str, steps: int | None = None) -> _Decoded:
        """The model's ``generate`` on one prompt under the request's seed, its decoder passes counted."""
        seed = request_seed(self.seed, key)
        input_ids = torch.tensor([ids], device=self.device)
        began = time.perf_counter()
        with self.seeded(seed), counted_calls(self.model.model.decoder) as calls:
            out = self.model.generate(input_ids, max_new_tokens=budget, **self.generate_kwargs(steps))
        return _Decoded(out.sequences[0, len(ids):].tolist(), calls[0], float(out.tokens_per_forward[0]), seed,
                        time.perf_counter() - began)

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """torch's global generators (CPU, and this CUDA device) seeded inside, restored after."""
        device = torch.device(self.device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # ---- likelihood -----------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[LoglikelihoodResult]:
        raise HarnessError(f"{NO_ELBO} (model '{self.name}')")

    def loglikelihood_rolling(self, requests: Sequence[RollingRequest]) -> list[RollingResult]:
        raise HarnessError(f"{NO_ELBO} (model '{self.name}')")

    # ---- throughput bench -----------------------------------------------------------------------
    def bench_variants(self) -> list:
        """The bench's one variant, ``entropy_bound`` (``harness.perf.throughput``): a request is one
        batched ``generate`` call of ``gen_length`` new tokens, ``steps`` its ``max_denoising_steps``
        (None: the model's setting). ``nfe`` counts decoder passes (a hook on the decoder), so ``tpf``
        is generated tokens / decoder passes; ``processed_tokens`` counts the canvas positions of
        those passes, not the encoder's one pass over the prompt and each finished canvas."""
        from harness.perf.throughput import Variant, weights_of

        params, weight_bytes = weights_of(self.model)

        def configure(setting) -> None:
            if setting.steps is not None:
                self.settings = replace(self.settings, max_denoising_steps=setting.steps)

        def describe(setting) -> dict[str, Any]:
            fingerprint = self.fingerprint
            steps = setting.steps or fingerprint["sampler"]["steps"]
            return {**fingerprint, "sampler": {**fingerprint["sampler"], "steps": steps}}

        variant = Variant("entropy_bound", "diffusion_gemma",
                          run=lambda p, s: self.bench_generate(p, s.gen_length, s.steps),
                          first=lambda p, s: self.bench_generate(p, 1, 1), params=params, weight_bytes=weight_bytes,
                          module=self.model.model.decoder, configure=configure, describe=describe)
        # every setting runs with its steps as max_denoising_steps: the masked samplers' rule
        # steps <= gen_length does not apply to a cap per canvas
        variant.adapt = lambda setting: setting  # type: ignore[method-assign]
        return [variant]

    @torch.no_grad()
    def bench_generate(self, prompts: list[list[int]], new: int, steps: int | None) -> int:
        """One batched ``generate`` (prompts of equal length), seeded by the run seed and the shape;
        the generated tokens: each row's first ``new`` up to and including its first EOS."""
        ids = torch.tensor(prompts, device=self.device)
        with self.seeded(request_seed(self.seed, f"bench:{ids.shape[1]}:{new}:{steps}")):
            out = self.model.generate(ids, max_new_tokens=new, **self.generate_kwargs(steps))
        rows = out.sequences[:, ids.shape[1]:ids.shape[1] + new].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row)) for row in rows)

