"""Task variants that follow the DiffuGPT/DiffuLLaMA authors' evaluation scripts (HKUNLP/DiffuLLaMA).

``eval-diffugpt.py`` scored the diffusion models, ``eval-llm.py`` the AR baselines; option
``script`` picks which one a multiple-choice variant follows (default ``eval-diffugpt``).

Multiple choice: every choice is a ``LoglikelihoodRequest`` with ``segments``, so the backend
encodes the context alone and each segment alone and concatenates the segment ids (the scripts'
tokenisation, not lm-eval's split of the joined text):

* HellaSwag: the cleaned query; segments (ending,), no leading space (both scripts).
* WinoGrande: context = the sentence up to the blank; ``eval-diffugpt`` segments (option,
  rest of the sentence stripped), ``eval-llm`` (option + " " + rest,).
* SIQA: "Question: {context} {question}\\nAnswer: "; segments (answer,) (both scripts).
* PIQA: "Question: {goal}\\nAnswer: "; ``eval-diffugpt`` segments (" " + solution,), ``eval-llm``
  (solution,).

``acc`` ranks by the backend's log-likelihood (for a ``paper_grid`` DLM that is minus the mean
masked-token loss, so the lowest loss wins). Under ``eval-llm`` ``acc_tokmean`` ranks by the
log-likelihood per continuation token, that script's ranking for HellaSwag and WinoGrande; it is
not reported under ``eval-diffugpt``, whose logprob is already a per-token mean.

"TriviaQA": ``triviaqa_diffugpt`` is the DLM script as released (SQuAD v1.1 validation, its
prompt with the "Quesion" typo, budget = the longest gold answer in tokens); ``triviaqa_paper`` is
what the authors meant (real TriviaQA, ``eval-llm.py``'s prompt, budget = the longest alias in
tokens). Neither has stop sequences; ``contains`` is the scripts' "em acc".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

from harness.config import TaskSpec
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult, LoglikelihoodRequest, LoglikelihoodResult
from harness.scoring.metric import fraction_metrics
from harness.tasks.answers import contains_match, exact_match, f1, normalize_answer
from harness.tasks.base import MultipleChoiceTask
from harness.tasks.generation import SQuAD, TriviaQAFoundry, skip_record, unique, was_skipped
from harness.tasks.likelihood import PIQA, HellaSwag, SocialIQA, WinoGrande

SCRIPTS = ("eval-diffugpt", "eval-llm")
Choices = list[tuple[str, tuple[str, ...]]]  # (context, continuation segments) per choice


def argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


class ScriptChoiceTask(MultipleChoiceTask):
    """Multiple choice as the DiffuGPT scripts tokenise and rank it; subclasses define ``choices``."""

    metrics = fraction_metrics("acc", "acc_tokmean")
    defaults: ClassVar[dict[str, Any]] = {"script": "eval-diffugpt"}

    def __init__(self, spec: TaskSpec, data_dir: Path | None, options: dict[str, Any] | None = None):
        super().__init__(spec, data_dir, options)
        self.options = {k: v for k, v in self.options_with(self.defaults).items() if k != "allow_code_exec"}
        if self.options["script"] not in SCRIPTS:
            raise HarnessError(f"task '{self.name}': script must be one of {', '.join(SCRIPTS)}, "
                               f"not '{self.options['script']}'")

    @property
    def script(self) -> str:
        return self.options["script"]

    formats_prompts = False  # the script's own segments, zero-shot

    def choices(self, doc: dict[str, Any]) -> Choices:
        raise NotImplementedError

    def requests(self, doc):
        return [LoglikelihoodRequest(context, "".join(segments), group=str(doc["id"]), segments=segments)
                for context, segments in self.choices(doc)]

    def process(self, doc, results: list[LoglikelihoodResult]):
        lls = [r.logprob for r in results]
        counts = [r.n_tokens for r in results]
        gold, pred = doc["gold"], argmax(lls)
        metrics = {"acc": float(pred == gold)}
        extra: dict[str, Any] = {"target": gold, "loglikelihoods": lls, "n_tokens": counts, "prediction": pred,
                                 "is_greedy": [r.is_greedy for r in results], "script": self.script}
        if self.script == "eval-llm":
            pred_tokmean = argmax([ll / max(n, 1) for ll, n in zip(lls, counts)])
            metrics["acc_tokmean"] = float(pred_tokmean == gold)
            extra["prediction_tokmean"] = pred_tokmean
        if any(r.stderr is not None for r in results):
            extra["loglikelihood_stderrs"] = [r.stderr for r in results]
        return metrics, extra


class HellaSwagDiffuGPT(ScriptChoiceTask, HellaSwag):
    """HellaSwag: the cleaned query, then the ending encoded alone (both scripts)."""

    def choices(self, doc):
        return [(doc["context"], (ending,)) for ending in doc["choices"]]


class WinoGrandeDiffuGPT(ScriptChoiceTask, WinoGrande):
    """WinoGrande: both options follow the sentence up to the blank (not lm-eval's partial scoring)."""

    def from_hub(self, row):
        sentence = row["sentence"]
        blank = sentence.index("_")
        return {"prefix": sentence[:blank], "rest": sentence[blank + 1:].strip(),
                "choices": [row["option1"], row["option2"]], "gold": {"1": 0, "2": 1}[str(row["answer"])]}

    def choices(self, doc):
        if self.script == "eval-llm":
            return [(doc["prefix"], (option + " " + doc["rest"],)) for option in doc["choices"]]
        return [(doc["prefix"], (option, doc["rest"])) for option in doc["choices"]]


class SocialIQADiffuGPT(ScriptChoiceTask, SocialIQA):
    """SIQA: "Question: {context} {question}\\nAnswer: " (trailing space kept), the answer alone."""

    def from_hub(self, row):
        return {"situation": row["context"], "question": row["question"],
                "choices": [row["answerA"], row["answerB"], row["answerC"]], "gold": int(row["label"]) - 1}

    def choices(self, doc):
        prompt = f"Question: {doc['situation']} {doc['question']}\nAnswer: "
        return [(prompt, (answer,)) for answer in doc["choices"]]


class PIQADiffuGPT(ScriptChoiceTask, PIQA):
    """PIQA: "Question: {goal}\\nAnswer: ", the solution with (eval-diffugpt) or without a leading space."""

    def from_hub(self, row):
        return {"goal": row["goal"], "choices": [row["sol1"], row["sol2"]], "gold": int(row["label"])}

    def choices(self, doc):
        space = " " if self.script == "eval-diffugpt" else ""
        return [(f"Question: {doc['goal']}\nAnswer: ", (space + sol,)) for sol in doc["choices"]]


# ---- "TriviaQA" -----------------------------------------------------------------------------------
def alias_match(prediction: str, aliases: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised alias or contains one."""
    pred = normalize_answer(prediction)
    return float(any(pred == alias or (alias and alias in pred) for alias in map(normalize_answer, aliases)))


class ScriptQA:
    """Mixin: the prompt, then a budget of the longest gold answer in tokens (all golds as the reference)."""

    formats_prompts = False  # the script's prompt, zero-shot

    def requests(self, doc):
        prompt = self.prompt(doc)
        tokens, reference = self.budget(unique(doc["answers"]), prompt)
        return [GenerateRequest(prompt, tokens, tuple(self.options["until"]), reference=reference,
                                gen_kwargs=self.gen_kwargs())]

    def scores(self, prediction: str, golds: list[str]) -> dict[str, float]:
        raise NotImplementedError

    def process(self, doc, results: list[GenerationResult]):
        if was_skipped(results):
            return {}, {**skip_record(results), "prediction": "", "target": doc["answers"]}
        prediction = results[0].text.strip()
        return self.scores(prediction, doc["answers"]), {"prediction": prediction, "target": doc["answers"],
                                                         "length": self.options["length"]}


class TriviaQADiffuGPT(ScriptQA, SQuAD):
    """``eval-diffugpt.py``'s "TriviaQA": SQuAD v1.1 validation in file order, first 2,000."""

    metrics = fraction_metrics("contains", "f1")
    defaults = {"prompt": "{context}\nQuesion{question}?\nAnswer: ", "until": [], "max_tokens": 32,
                "length": "oracle", "oracle_slack": 0, "max_docs": 2000, "diffusion_steps": None}

    def scores(self, prediction, golds):
        return {"contains": contains_match(prediction, golds), "f1": f1(prediction, golds)}


class TriviaQAPaper(ScriptQA, TriviaQAFoundry):
    """Real TriviaQA with the protocol ``eval-llm.py`` meant: first 2,000 questions, aliases as golds."""

    metrics = fraction_metrics("contains", "exact_match", "f1")
    defaults = {"prompt": "Question: {question}?\nAnswer: ", "until": [], "max_tokens": 32, "length": "oracle",
                "oracle_slack": 0, "max_docs": 2000, "diffusion_steps": None}

    def scores(self, prediction, golds):
        return {"contains": alias_match(prediction, golds), "exact_match": exact_match(prediction, golds),
                "f1": f1(prediction, golds)}
