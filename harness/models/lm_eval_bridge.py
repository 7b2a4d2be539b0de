"""The harness's models (AR and diffusion) as the lm-eval model ``harness``.

Installed, the package registers it for plain ``lm_eval --model harness`` (``harness.lm_eval_hook``);
``harness lm-eval ARGS`` is lm-eval's command line with the harness's local task data added, e.g.

    lm_eval --model harness --model_args model=smollm2-135m,estimator=mc_time --tasks piqa

Keys of ``--model_args`` other than ``model`` go to the backend as ``--model-args`` do for
``harness run``; lm-eval's ``batch_size`` and ``device`` are honoured (device: CUDA when there is
one, else the CPU). Generation requests go to the backend in one call, which batches them. Of
lm-eval's generation kwargs, ``until`` (a string or a list) and ``max_gen_toks`` (default 256, as
lm-eval's HF backend) set the stops and the budget; decoding is greedy when ``do_sample`` is false
or ``temperature`` is 0 (or unset), else it samples with ``temperature`` and ``top_p``, which only the
masked-diffusion backend does (the request's sampler settings); any other kwarg is refused.
``--apply_chat_template [NAME]`` renders with the tokenizer's chat template (or its template NAME).
"""
from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models first (see harness.lm_eval_hook)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from harness.errors import HarnessError
from harness.models.base import GenerateRequest, LoglikelihoodRequest, RollingRequest
from harness.models.factory import build_model
from harness.tasks.generation import GEN_KWARG_KEYS

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HF backend's default budget
GEN_KWARGS = GEN_KWARG_KEYS  # lm-eval's names, as ``--gen_kwargs`` takes them


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def generate_request(context: str, gen_kwargs: dict[str, Any], can_sample: bool) -> GenerateRequest:
    """One lm-eval ``generate_until`` request as the harness's request (see the module docstring)."""
    unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
    if unknown:
        raise HarnessError(f"lm-eval gen_kwargs {', '.join(unknown)} are not supported by the harness model "
                           f"(supported: {', '.join(GEN_KWARGS)})")
    until = gen_kwargs.get("until")
    if until is None:
        until = ()
    elif isinstance(until, str):
        until = (until,)
    elif isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        until = tuple(until)
    else:
        raise HarnessError(f"lm-eval gen_kwargs until must be a string or a list of strings, not {until!r}")
    budget = gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if type(budget) is not int or budget < 1:
        raise HarnessError(f"lm-eval gen_kwargs max_gen_toks must be a positive integer, not {budget!r}")
    temperature = gen_kwargs.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
        raise HarnessError(f"lm-eval gen_kwargs temperature must be a non-negative number, not {temperature!r}")
    sampler: dict[str, Any] = {}
    if gen_kwargs.get("do_sample") is False or temperature == 0:
        if can_sample and ("do_sample" in gen_kwargs or "temperature" in gen_kwargs):
            sampler["temperature"] = 0.0  # asked for greedy decoding: over the model's own temperature
    elif not can_sample:
        raise HarnessError(f"lm-eval asks to sample (temperature={temperature}), but this backend decodes "
                           f"greedily only; set do_sample=false or temperature=0 in --gen_kwargs")
    else:
        sampler["temperature"] = float(temperature)
        if gen_kwargs.get("top_p") is not None:
            sampler["top_p"] = float(gen_kwargs["top_p"])
    return GenerateRequest(context, budget, until, gen_kwargs=sampler)


@register_model("harness")
class HarnessLM(LM):
    def __init__(self, model: str, batch_size: int | str = 16, device: str | None = None, dtype: str | None = None,
                 seed: int = 1234, **model_args: Any):
        super().__init__()
        import torch

        from harness.models.diffusion.backend import DiffusionLM

        size = "auto" if str(batch_size).startswith("auto") else batch_size  # lm-eval's auto:N
        device = device or default_device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"  # lm-eval's CLI defaults to cuda:0; like its HF backend, fall back to the CPU
        self.scorer = build_model(model, device=device, dtype=dtype, batch_size=size, model_args=model_args)
        self.scorer.seed = int(seed)
        self._device = device
        self.can_sample = isinstance(self.scorer, DiffusionLM)  # takes temperature/top_p per request
        self.template = "default"

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([LoglikelihoodRequest(*r.args) for r in requests])
        return [(r.logprob, r.is_greedy) for r in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [r.logprob for r in self.scorer.loglikelihood_rolling([RollingRequest(r.args[0]) for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        batch = [generate_request(context, gen_kwargs, self.can_sample) for context, gen_kwargs in
                 (r.args for r in requests)]
        return [result.text for result in self.scorer.generate(batch)] if batch else []

    # ---- chat templates (lm-eval's --apply_chat_template) -------------------------------------
    @property
    def tokenizer_name(self) -> str:
        name = getattr(self.scorer.tokenizer, "name_or_path", None) or self.scorer.name
        return str(name).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template's text (``True``: the tokenizer's own; a name: one of its named templates)."""
        if chat_template is False or chat_template is None:
            return None
        name = chat_template if isinstance(chat_template, str) else "default"
        text = self.scorer.chat_template(name)
        self.template = name
        return text

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.scorer.render_chat(chat_history, self.template, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results config: what produced the numbers."""
        return {"harness_fingerprint": self.scorer.fingerprint}


def run_lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's command line with the ``harness`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
