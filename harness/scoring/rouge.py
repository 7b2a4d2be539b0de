"""ROUGE-1/2/L F-measures of one prediction against one reference, through the `rouge-score` package.

Scores are x100; ``rouge_avg`` is the mean of the three (DiffuGPT's "rougeAvg"). Tokenisation is
rouge-score's default (lower case, non-alphanumerics to spaces); ``use_stemmer`` applies the
Porter stemmer to both sides.
"""
from __future__ import annotations

import functools

from harness.errors import HarnessError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@functools.cache
def _scorer(use_stemmer: bool):
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise HarnessError("ROUGE needs the 'rouge-score' package: pip install 'dlm-harness[eval]'") from exc
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_f(prediction: str, reference: str, use_stemmer: bool = True) -> dict[str, float]:
    """{"rouge1", "rouge2", "rougeL", "rouge_avg"}: F-measures x100."""
    scores = _scorer(use_stemmer).score(reference, prediction)
    out = {name: 100.0 * scores[name].fmeasure for name in ROUGE_TYPES}
    out["rouge_avg"] = sum(out.values()) / len(ROUGE_TYPES)
    return out
