"""Build a scorer from a model-card name, a checkpoint directory or a hub id, plus --model-args."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.config import DiffusionSpec, ModelCard
from harness.errors import HarnessError, unknown_name
from harness.models.base import LanguageModel
from harness.models.settings import Settings, settings_for

DIFFUSION_CONFIG = "diffusion_config.json"
ENDPOINT_PREFIX = "openai:"
LM_EVAL_ENDPOINTS = ("local-completions", "local-chat-completions")


def parse_model_args(text: str | None) -> dict[str, Any]:
    """``k=v,k2=v2`` with ints, floats and booleans converted."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise HarnessError(f"--model-args expects key=value pairs separated by commas, got '{part}'")
        out[key.strip()] = convert(value.strip())
    return out


def convert(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def resolve_card(name_or_path: str) -> ModelCard:
    """A registered card, or an ad-hoc card for a local directory or a hub id."""
    from harness.catalog import catalog

    models = catalog().models
    if name_or_path in models:
        return models.get(name_or_path)
    if name_or_path.startswith(ENDPOINT_PREFIX):
        return endpoint_card(name_or_path[len(ENDPOINT_PREFIX):])
    if name_or_path in LM_EVAL_ENDPOINTS:  # lm-eval's names: the URL comes as --model_args base_url=...
        return ModelCard(name=name_or_path, backend="endpoint")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if (path / DIFFUSION_CONFIG).exists():
            import json

            config = json.loads((path / DIFFUSION_CONFIG).read_text())
            spec = DiffusionSpec(format="harness", kind=config.get("kind", "shifted"),
                                 mask_id=config.get("mask_token_id"))
            return ModelCard(name=path.name, backend="diffusion", weights={"path": str(path)}, diffusion=spec)
        from harness.models.diffusion_gemma import is_diffusion_gemma

        if is_diffusion_gemma(path):
            return ModelCard(name=path.name, backend="diffusion_gemma", weights={"path": str(path)})
        if released_dlm(path):
            return ModelCard(name=path.name, backend="diffusion", weights={"path": str(path)})
        return ModelCard(name=path.name, backend="hf_ar", weights={"path": str(path)})
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return ModelCard(name=name_or_path, backend="hf_ar", weights={"hub": name_or_path})
    if name_or_path.startswith((".", "/", "~")) or "/" in name_or_path or "\\" in name_or_path:
        raise HarnessError(f"model path '{name_or_path}' does not exist (and is no model card name or hub id)")
    raise unknown_name("model", name_or_path, models.names())


def endpoint_card(url: str) -> ModelCard:
    """An ad-hoc card for ``--model openai:URL``: the URL is its ``base_url`` argument."""
    from harness.serving.client import check_base_url

    url = check_base_url(url)
    return ModelCard(name=f"openai:{url}", backend="endpoint", defaults={"base_url": url})


def released_dlm(path: Path) -> bool:
    """True for a local checkpoint in a released DLM layout (``formats.detect_format`` knows it)."""
    from harness.models.diffusion.formats import detect_format

    try:
        detect_format(path)
    except HarnessError:
        return False
    return True


def build_model(model: str | ModelCard, *, device: str = "cpu", dtype: str | None = None,
                batch_size: int | str = 16, model_args: dict[str, Any] | None = None,
                settings: Settings | None = None) -> LanguageModel:
    """A scorer for a card (or a name, resolved here). ``settings``: already parsed model arguments
    (a run plan's); otherwise the card's defaults and ``model_args`` are parsed."""
    card = resolve_card(model) if isinstance(model, str) else model
    if settings is None:
        settings = settings_for(card.backend, {**card_model_args(card), **(model_args or {})})
    dtype = dtype or card.dtype
    if card.backend == "endpoint":
        from harness.models.endpoint import EndpointLM

        return EndpointLM(settings, batch_size=batch_size)
    if card.backend == "hf_ar":
        from harness.models.hf_ar import HFCausalLM
        from harness.models.loading import load_causal_lm, resolve_weights

        weights = resolve_weights(card.weights)
        lm, tokenizer = load_causal_lm(weights, dtype=dtype, device=device)
        return HFCausalLM(lm, tokenizer, name=card.name, weights=weights, dtype=dtype, device=device,
                          batch_size=batch_size, settings=settings)
    if card.backend == "diffusion_gemma":
        from harness.models.diffusion_gemma import DiffusionGemmaLM

        return DiffusionGemmaLM.from_card(card, settings, device=device, dtype=dtype, batch_size=batch_size)
    from harness.models.diffusion.backend import DiffusionLM

    return DiffusionLM.from_card(card, settings, device=device, dtype=dtype, batch_size=batch_size)


def card_model_args(card: ModelCard) -> dict[str, Any]:
    """The model arguments a card sets: its diffusion spec's settings, then its ``defaults``."""
    spec = card.diffusion
    named = {k: getattr(spec, k) for k in ("estimator", "sampler", "greedy", "start_token")} if spec else {}
    return {**{k: v for k, v in named.items() if v is not None}, **card.defaults}
