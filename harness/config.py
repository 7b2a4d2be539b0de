"""Typed specs loaded from YAML: tasks, suites and model cards.

The built-in YAML ships inside the package (``harness/resources/``: ``tasks/``, ``suites/``,
``models/``, ``papers/``) and is found relative to this module, never the checkout; user
directories are added by ``harness.catalog``. Every file is validated on load; a problem names the
file (and line, for malformed YAML).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError

FAMILIES = ("ar", "diffusion", "diffusion_gemma")
SUITE_KINDS = ("eval", "throughput", "serving")
BACKENDS = ("hf_ar", "diffusion", "diffusion_gemma", "endpoint")
# the package's own YAML tree: the same layout as an include directory (see harness.catalog), plus papers/
RESOURCES_DIR = Path(__file__).resolve().parent / "resources"
TASKS_DIR = RESOURCES_DIR / "tasks"
SUITES_DIR = RESOURCES_DIR / "suites"
MODELS_DIR = RESOURCES_DIR / "models"
PAPERS_DIR = RESOURCES_DIR / "papers"


@dataclass(frozen=True)
class DiffusionSpec:
    format: str = "harness"
    kind: str = "shifted"  # shifted (AR-adapted) | unshifted (trained as a DLM)
    mask_id: int | None = None
    # the paper's settings for this model; None: harness.models.settings' default
    estimator: str | None = None
    sampler: str | None = None
    greedy: str | None = None  # is_greedy: parallel (one pass) | sequential (SMDM, LLaDA)
    start_token: str | None = None  # bos before every prompt | none (DiffuGPT)
    block_size: int | None = None  # block diffusion: the checkpoint's block size, checked at load


@dataclass(frozen=True)
class ModelCard:
    name: str
    backend: str  # hf_ar | diffusion | diffusion_gemma | endpoint
    weights: dict[str, Any] = field(default_factory=dict)  # none for an endpoint (its defaults name the URL)
    description: str = ""
    dtype: str = "float32"
    parameters: int | None = None
    diffusion: DiffusionSpec | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    path: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    builder: str  # "module:attr" of the Task class
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # local file(s) under the data dir
    hub: dict[str, Any] = field(default_factory=dict)  # the same data on the Hugging Face hub
    options: dict[str, Any] = field(default_factory=dict)
    path: str = ""


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    tasks: tuple[str, ...]
    description: str = ""
    limit: int | None = None
    # backend arguments by model family: {"ar": {...}, "diffusion": {...}}
    model_args: dict[str, Any] = field(default_factory=dict)
    kind: str = "eval"  # eval | throughput | serving
    # eval suites: per-task options {task: {option: value, ar: {...}, diffusion: {...}}} (the family
    # keys hold options for that model family only); throughput and serving suites: the sweep
    options: dict[str, Any] = field(default_factory=dict)
    # seeds to run the suite with, one run each (the paper protocols sample); empty: the run's seed
    seeds: tuple[int, ...] = ()
    path: str = ""

    def task_options(self, task: str, family: str) -> dict[str, Any]:
        """The suite's options for ``task`` when run by a model of ``family`` (ar | diffusion)."""
        options = dict(self.options.get(task, {}))
        shared = {k: v for k, v in options.items() if k not in FAMILIES}
        return {**shared, **options.get(family, {})}


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse one YAML mapping; malformed files raise a HarnessError naming file and line."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise HarnessError(f"{where}: malformed YAML: {problem}") from exc
    if not isinstance(data, dict):
        raise HarnessError(f"{path}: expected a mapping at the top level")
    return data


def build(cls: type, data: dict[str, Any], path: Path) -> Any:
    """Instantiate a spec dataclass, rejecting unknown and missing keys with a clear message."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HarnessError(f"{path}: unknown key(s) {', '.join(unknown)} for a {cls.__name__} "
                           f"(allowed: {', '.join(k for k in fields if k != 'path')})")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and n not in data]
    if required:
        raise HarnessError(f"{path}: missing required key(s) {', '.join(required)}")
    try:
        return cls(**data, path=str(path))
    except TypeError as exc:
        raise HarnessError(f"{path}: {exc}") from exc


def load_model_card(path: Path) -> ModelCard:
    data = read_yaml(path)
    if isinstance(data.get("diffusion"), dict):
        data["diffusion"] = _diffusion_spec(data["diffusion"], path)
    card = build(ModelCard, data, path)
    if card.backend not in BACKENDS:
        raise HarnessError(f"{path}: backend must be one of {', '.join(BACKENDS)}, not '{card.backend}'")
    if not card.weights and card.backend != "endpoint":
        raise HarnessError(f"{path}: a {card.backend} model card needs weights")
    if card.backend == "diffusion" and (card.diffusion is None or card.diffusion.mask_id is None):
        raise HarnessError(f"{path}: a diffusion model card needs diffusion.mask_id")
    return card


def _diffusion_spec(data: dict[str, Any], path: Path) -> DiffusionSpec:
    names = {f.name for f in dataclasses.fields(DiffusionSpec)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise HarnessError(f"{path}: unknown diffusion key(s) {', '.join(unknown)}")
    spec = DiffusionSpec(**data)
    if spec.kind not in ("shifted", "unshifted"):
        raise HarnessError(f"{path}: diffusion.kind must be shifted or unshifted, not '{spec.kind}'")
    if spec.block_size is not None and (type(spec.block_size) is not int or spec.block_size < 1):
        raise HarnessError(f"{path}: diffusion.block_size must be a positive integer, not {spec.block_size!r}")
    return spec


def load_task_spec(path: Path) -> TaskSpec:
    return build(TaskSpec, read_yaml(path), path)


def load_suite_spec(path: Path) -> SuiteSpec:
    data = read_yaml(path)
    for key in ("tasks", "seeds"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    suite = build(SuiteSpec, data, path)
    families = set(suite.model_args) - set(FAMILIES)
    if families:
        raise HarnessError(f"{path}: model_args takes the families 'ar' and 'diffusion', not {sorted(families)}")
    if suite.kind not in SUITE_KINDS:
        raise HarnessError(f"{path}: kind must be one of {', '.join(SUITE_KINDS)}, not '{suite.kind}'")
    if suite.kind == "eval":
        strays = sorted(set(suite.options) - set(suite.tasks))
        if strays:
            raise HarnessError(f"{path}: options name task(s) the suite does not run: {', '.join(strays)}")
        for task, options in suite.options.items():
            if not isinstance(options, dict) or any(not isinstance(options.get(f, {}), dict) for f in FAMILIES):
                raise HarnessError(f"{path}: options of '{task}' must be a mapping (ar/diffusion: mappings)")
    if not all(isinstance(seed, int) for seed in suite.seeds):
        raise HarnessError(f"{path}: seeds must be a list of integers")
    return suite
