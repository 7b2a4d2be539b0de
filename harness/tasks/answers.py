"""Answer extraction and comparison for generation tasks.

* lm-eval's ``exact_match`` metric (``lm_eval_exact_match``): the regexes to ignore removed in
  order, then optionally lower case, no punctuation (``string.punctuation``), no digits; the texts
  must then be equal, with nothing else normalised. A prediction matches when it equals any reference.
* QA: SQuAD's official normalisation (lower case, no punctuation, no articles a/an/the, single
  spaces), exact match and token F1, each the maximum over the gold answers; ``contains_match``
  is the DiffuGPT evaluation script's "em acc" (a normalised gold answer occurs in the
  normalised prediction).
* GSM8K: lm-eval's two filters: strict (the number after "#### ") and flexible (the last number
  in the text), compared by lm-eval's exact match with its gsm8k settings (``GSM8K_IGNORE``: no
  commas, no "$", nothing up to "#### ", no final "."; lower case).
* Numbers: parsed after removing commas, "$" and a final "."; equal within a relative tolerance.
* Multiple choice: the first standalone option letter.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


GSM8K_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def lm_eval_exact_match(prediction: str, references: Sequence[str], *, regexes_to_ignore: Sequence[str] = (),
                        ignore_case: bool = False, ignore_punctuation: bool = False,
                        ignore_numbers: bool = False) -> float:
    """lm-eval's exact match of one prediction against any of ``references`` (see the module docstring)."""
    def clean(text: str) -> str:
        for pattern in regexes_to_ignore:
            text = re.sub(pattern, "", text)
        if ignore_case:
            text = text.lower()
        if ignore_punctuation:
            text = text.translate(_NO_PUNCTUATION)
        if ignore_numbers:
            text = text.translate(_NO_DIGITS)
        return text

    cleaned = clean(prediction)
    return float(any(cleaned == clean(reference) for reference in references))


_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NO_DIGITS = str.maketrans("", "", string.digits)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's official answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(gold) for gold in golds))


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(prediction: str, golds: Sequence[str]) -> float:
    return max((token_f1(prediction, gold) for gold in golds), default=0.0)


def contains_match(prediction: str, golds: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(gold and gold in pred for gold in map(normalize_answer, golds)))


def gsm8k_strict(text: str) -> str | None:
    """The first "#### <number>" answer, or None."""
    found = GSM8K_STRICT.search(text)
    return found.group(1) if found else None


def gsm8k_flexible(text: str) -> str | None:
    """The last number in the text, or None."""
    found = GSM8K_FLEXIBLE.findall(text)
    return next((group for group in found[-1] if group), None) if found else None


def clean_number_text(text: str) -> str:
    """lm-eval's gsm8k exact-match clean-up of a prediction or target."""
    text = re.sub(r"(?s).*#### ", "", text)
    text = text.replace(",", "").replace("$", "")
    return re.sub(r"\.$", "", text.strip()).lower()


def parse_number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(clean_number_text(text))
    except ValueError:
        return None


def numbers_match(prediction: float | None, gold: float, rel_tol: float) -> bool:
    """|prediction - gold| <= rel_tol * max(1, |gold|)."""
    return prediction is not None and abs(prediction - gold) <= rel_tol * max(1.0, abs(gold))


def gsm8k_exact_match(text: str, solution: str) -> dict[str, float]:
    """lm-eval's gsm8k exact match of both extractions against the solution (a text without a
    match is lm-eval's "[invalid]", which matches nothing)."""
    return {name: 0.0 if found is None else
            lm_eval_exact_match(found, [solution], regexes_to_ignore=GSM8K_IGNORE, ignore_case=True)
            for name, found in (("strict", gsm8k_strict(text)), ("flexible", gsm8k_flexible(text)))}


def numeric_match(text: str, value: float, rel_tol: float) -> dict[str, float]:
    """Both gsm8k extractions of ``text`` parsed as numbers and compared with ``value``."""
    return {name: float(numbers_match(parse_number(found), value, rel_tol))
            for name, found in (("strict", gsm8k_strict(text)), ("flexible", gsm8k_flexible(text)))}


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The first option letter standing alone ("B", "(B)", "B." ...), or None."""
    found = re.search(rf"\b([{letters}])\b", text)
    return found.group(1) if found else None
