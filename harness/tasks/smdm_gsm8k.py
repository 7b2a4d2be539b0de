"""SMDM's GSM8K protocol (``evaluate_gsm8k.py`` of ML-GSAI/SMDM) as a task.

Prompt: zero-shot ``"Question: {question}"``, no stop sequences. Each request carries
``gen_kwargs={"stages": 2, "canvas_length": 256}``: SMDM's canvas is 256 tokens with the prompt
included, so the diffusion backend fills what the prompt leaves, decodes it (special tokens
dropped), encodes prompt and text as the next prompt and fills what remains again. AR models
ignore both and generate ``max_tokens`` (256). The sampler settings (256 steps, length 256, CFG 0.1,
temperature 0.1) belong in a suite's model_args, not here.

Scoring (``acc``): the last match of ``"#### (.*)$"`` searched without ``re.MULTILINE``, so only
the final line counts (``$`` also matches before one trailing newline) and the capture runs from
the first ``"#### "`` on that line to its end. The capture and the gold answer are normalised
(:func:`normalize_final_answer`) and are equal if they are the same string or the same number.
SMDM compares with sympy; this comparison is numeric only, needs no extra packages and does not
depend on what is installed.

SMDM scores the whole decoded sequence (prompt and both stages); the scorer here gets the
generated text of both stages. The two agree because no prompt contains "####" or ends in "#":
every match lies in the generated text and captures the same characters either way.
"""
from __future__ import annotations

import re
from fractions import Fraction

from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult
from harness.scoring.metric import fraction_metrics
from harness.tasks.generation import GSM8K

SMDM_ANSWER = re.compile(r"#### (.*)$")  # no re.MULTILINE, as SMDM's get_acc
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:/\d+)?")
# Unit words dropped from an answer (longer words first, so "hours" goes before "hour").
UNIT_WORDS = ("dollars", "dollar", "cents", "hours", "hour", "minutes", "minute", "seconds", "days", "weeks",
              "years", "miles", "mph", "feet", "foot", "inches", "pounds", "meters", "km", "cm", "ft",
              "points", "students", "degrees", "units", "square", "ways")


def smdm_answer(text: str) -> str:
    """The last ``"#### (.*)$"`` capture in ``text`` (no multiline), or "" when there is none."""
    found = SMDM_ANSWER.findall(text)
    return found[-1] if found else ""


def normalize_final_answer(answer: str) -> str:
    """The part after the last "=", without LaTeX wrappers, "$", spaces, unit words, thousands
    commas or a final "%"; \\frac{a}{b} becomes a/b."""
    text = answer.split("=")[-1]
    text = re.sub(r"\\(?:text|textbf|mbox|boxed)\{(.*?)\}", r"\1", text)
    text = re.sub(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", text)
    text = re.sub(r"\s+", "", text.replace("\\$", "").replace("$", "").replace("\\%", "%"))
    for word in UNIT_WORDS:
        text = text.replace(word, "")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)
    return text[:-1] if text.endswith("%") and NUMBER.fullmatch(text[:-1]) else text


def parse_value(text: str) -> Fraction | None:
    """The exact value of a normalised number ("18", "18.0", "-2.5", "3/4", "1e3"), or None."""
    if not NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except ZeroDivisionError:
        return None


def answers_match(prediction: str, gold: str) -> bool:
    """Same normalised string, or the same number."""
    pred, target = normalize_final_answer(prediction), normalize_final_answer(gold)
    if not pred:
        return False
    if pred == target:
        return True
    value = parse_value(pred)
    return value is not None and value == parse_value(target)


class SMDMGSM8K(GSM8K):
    """GSM8K test as SMDM evaluates it: "Question: …" zero-shot, two sampling stages, "#### n" on
    the final line compared numerically with the gold answer."""

    formats_prompts = False  # SMDM's zero-shot prompt
    metrics = fraction_metrics("acc")
    defaults = {"prompt": "Question: {question}", "max_tokens": 256, "stages": 2, "canvas_length": 256,
                "max_docs": None}

    def __init__(self, spec, data_dir, options=None):
        super().__init__(spec, data_dir, options)
        stages = self.options["stages"]
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise HarnessError(f"task '{self.name}': stages must be a positive integer, not {stages!r}")

    def requests(self, doc):
        return [GenerateRequest(self.prompt(doc), self.options["max_tokens"], (),
                                gen_kwargs={"stages": self.options["stages"],
                                            "canvas_length": self.options["canvas_length"]})]

    def process(self, doc, results: list[GenerationResult]):
        prediction = smdm_answer(results[0].text)
        target = doc["answer"].split("#### ")[-1].strip()
        return {"acc": float(answers_match(prediction, target))}, {"prediction": prediction, "target": target}
