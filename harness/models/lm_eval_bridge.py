"""The harness's models (AR and diffusion) as an lm-eval model named ``harness``.

Importing this module registers the class with lm-eval. lm-eval 0.4.x looks models up in its own
registry only (it reads no plugin entry points), so the harness offers ``harness lm-eval ARGS``:
lm-eval's own command line with this model registered, e.g.

    harness lm-eval --model harness --model_args model=smollm2-135m,estimator=mc_time --tasks piqa

Keys of ``--model_args`` other than ``model`` go to the backend as ``--model-args`` do for
``harness run``; lm-eval's ``batch_size`` and ``device`` are honoured.
"""
from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from harness.models.base import GenerateRequest, LoglikelihoodRequest, RollingRequest
from harness.models.factory import build_model


@register_model("harness")
class HarnessLM(LM):
    def __init__(self, model: str, batch_size: int | str = 16, device: str | None = None, dtype: str | None = None,
                 seed: int = 1234, **model_args: Any):
        super().__init__()
        import torch

        size = batch_size if str(batch_size) == "auto" else int(str(batch_size).split(":")[0])
        if not device or (device.startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI defaults to cuda; like its HF backend, fall back to the CPU
        self.scorer = build_model(model, device=device, dtype=dtype, batch_size=size,
                                  model_args=model_args)
        self.scorer.seed = int(seed)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = self.scorer.loglikelihood([LoglikelihoodRequest(*r.args) for r in requests])
        return [(r.logprob, r.is_greedy) for r in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [r.logprob for r in self.scorer.loglikelihood_rolling([RollingRequest(r.args[0]) for r in requests])]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.get("max_gen_toks", 256))
            out.append(self.scorer.generate([GenerateRequest(context, max_tokens, tuple(until))])[0].text)
        return out


def run_lm_eval_cli(argv: list[str]) -> None:
    """lm-eval's command line with the ``harness`` model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
