"""A run plan: what a command asked for, resolved once and validated before any weights load.

``RunConfig`` is the request as the CLI, the bench, ``harness validate`` or the Python API state it
(names and raw model arguments). ``plan_run`` resolves it in one place: the model card (looked up
once), the model family, the suite, the model arguments (card, then the suite's for the family,
then the command's) parsed into typed settings, each task's options (the suite's for the family,
then the command's), the limit, the device and the dtype. Everything downstream takes the plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import ModelCard, SuiteSpec
from harness.errors import HarnessError
from harness.models.settings import TRANSPORT_ARGS, Settings, settings_for
from harness.tasks.prompt_format import PLAIN, PromptFormat

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RunConfig:
    """What was asked for (names, raw ``model_args`` and ``task_options``)."""

    model: str
    tasks: list[str]  # task and suite names, in any mix
    suite: str | None = None
    limit: int | float | None = None  # documents per task, or a fraction of them (< 1, as lm-eval)
    seed: int = 1234
    batch_size: int | str = 16
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    output: Path = Path("runs")
    num_fewshot: int | None = None  # every task's num_fewshot
    gen_kwargs: dict[str, Any] = field(default_factory=dict)  # every generation task's (lm-eval's names)
    chat_template: str | None = None  # --apply_chat_template: "default" or a named template
    system_instruction: str | None = None
    fewshot_as_multiturn: bool = False
    use_cache: bool = True  # reuse records stored by other runs (harness.runner.cache_key)


@dataclass(frozen=True)
class RunPlan:
    """A resolved run. ``model_args`` are the merged raw arguments (part of the run's identity);
    ``settings`` their typed, validated form, which builds the backend."""

    model: str
    card: ModelCard
    family: str  # ar | diffusion | diffusion_gemma (the key of a suite's model_args)
    settings: Settings
    model_args: dict[str, Any]
    tasks: tuple[str, ...]
    task_options: dict[str, dict[str, Any]]
    suite: str | None
    limit: int | None
    seed: int
    batch_size: int | str
    device: str
    dtype: str
    data_dir: Path | None
    output: Path
    prompt_format: PromptFormat = PLAIN
    use_cache: bool = True

    def identity(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """What determines a run's numbers; its hash is the run id."""
        identity = {"model": self.model, "fingerprint": stable_fingerprint(fingerprint), "tasks": list(self.tasks),
                    "limit": self.limit, "seed": self.seed,
                    "model_args": {k: v for k, v in self.model_args.items() if k not in TRANSPORT_ARGS},
                    "task_options": self.task_options}
        if self.prompt_format != PLAIN:  # runs from before prompt formats keep their ids
            identity["prompt_format"] = self.prompt_format.recorded()
        return identity

    def recorded(self) -> dict[str, Any]:
        """The plan as stored with the run (JSON-ready)."""
        return {"model": self.model, "tasks": list(self.tasks), "suite": self.suite, "limit": self.limit,
                "seed": self.seed, "batch_size": self.batch_size, "device": self.device, "dtype": self.dtype,
                "model_args": self.model_args, "task_options": self.task_options,
                "prompt_format": self.prompt_format.recorded(), "use_cache": self.use_cache,
                "data_dir": None if self.data_dir is None else str(self.data_dir), "output": str(self.output)}


def stable_fingerprint(fingerprint: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint less what cannot change a number (the batch size)."""
    return {k: v for k, v in fingerprint.items() if k != "batch_size"}


def plan_run(config: RunConfig, card: ModelCard | None = None, *, require_tasks: bool = True) -> RunPlan:
    """Resolve and validate ``config`` (see the module docstring); ``card``: already resolved;
    ``require_tasks=False`` for a plan that only builds the model (the throughput bench)."""
    from harness.catalog import catalog
    from harness.models.batching import parse_batch_size
    from harness.models.factory import card_model_args, resolve_card

    check_limit(config.limit)
    check_output_dir(config.output)
    card = card or resolve_card(config.model)
    family = model_family(card, config.model_args)
    suite_name, tasks = split_suites(config.suite, config.tasks)
    suite = catalog().suites.get(suite_name) if suite_name else None
    names = list(dict.fromkeys([*(suite.tasks if suite else []), *tasks]))
    if not names and require_tasks:
        raise HarnessError("nothing to run: give --tasks and/or --suite")
    for name in names:
        catalog().tasks.get(name)
    if card.backend == "diffusion_gemma":
        from harness.models.diffusion_gemma import check_tasks

        check_tasks(names)  # no likelihoods: refused before any weights load
    served = card.backend == "endpoint"  # a suite's backend arguments are the local backends'
    model_args = {**(suite.model_args.get(family, {}) if suite and not served else {}), **config.model_args}
    if config.chat_template and card.backend == "diffusion_gemma":
        model_args["chat_template"] = False  # the task renders the chat; the backend must not wrap it again
    settings = settings_for(card.backend, {**card_model_args(card), **model_args})
    parse_batch_size(config.batch_size)
    options = task_options(names, suite, family, run_wide_options(config, names, family, greedy=not served),
                           config.task_options)
    prompt_format = PromptFormat(config.chat_template, config.system_instruction or None, config.fewshot_as_multiturn)
    return RunPlan(model=config.model, card=card, family=family, settings=settings, model_args=model_args,
                   tasks=tuple(names), task_options=options, suite=suite_name,
                   limit=config.limit if config.limit is not None else (suite.limit if suite else None),
                   seed=config.seed, batch_size=config.batch_size, device=check_device(config.device),
                   dtype=served_dtype(config.dtype) if served else check_dtype(config.dtype or card.dtype),
                   data_dir=config.data_dir, output=config.output,
                   prompt_format=prompt_format, use_cache=config.use_cache)


def split_suites(suite: str | None, names: list[str]) -> tuple[str | None, list[str]]:
    """``--tasks`` may name suites (lm-eval's groups): (the one suite, the tasks). Several suites in
    one run are refused, since a suite's model arguments apply to the whole run."""
    from harness.catalog import catalog

    suites = catalog().suites
    named = [name for name in names if name in suites and name not in catalog().tasks]
    chosen = list(dict.fromkeys(([suite] if suite else []) + named))
    if len(chosen) > 1:
        raise HarnessError(f"one suite a run, not {', '.join(chosen)}: run them one after the other")
    return (chosen[0] if chosen else None), [name for name in names if name not in named]


def model_family(card: ModelCard, model_args: dict[str, Any]) -> str:
    """ar | diffusion | diffusion_gemma: the card's backend, or what a served model runs."""
    if card.backend == "endpoint":
        return str(model_args.get("family") or card.defaults.get("family") or "ar")
    return card.backend if card.backend in ("diffusion", "diffusion_gemma") else "ar"


def run_wide_options(config: RunConfig, names: list[str], family: str, greedy: bool = True) -> dict[str, dict[str, Any]]:
    """``--num_fewshot`` (every task) and ``--gen_kwargs`` (every generation task) as task options;
    ``greedy``: the backend decodes greedily (the local AR backend), so sampling is refused."""
    from harness.catalog import catalog

    if family == "ar" and greedy and (config.gen_kwargs.get("do_sample") or config.gen_kwargs.get("temperature")
                           or config.gen_kwargs.get("top_p", 1.0) != 1.0):
        raise HarnessError("--gen_kwargs: the AR backend decodes greedily (temperature 0, do_sample false)")
    options: dict[str, dict[str, Any]] = {}
    for name in names:
        if config.num_fewshot is not None:
            options.setdefault(name, {})["num_fewshot"] = config.num_fewshot
        cls = catalog().task_class(name)
        if config.gen_kwargs and cls.output_type == "generate_until" and cls.formats_prompts:
            options.setdefault(name, {})["gen_kwargs"] = dict(config.gen_kwargs)
    return options


def task_options(names: list[str], suite: SuiteSpec | None, family: str, run_wide: dict[str, dict[str, Any]],
                 given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the suite's options for this family, then the run-wide ones (``--num_fewshot``,
    ``--gen_kwargs``, whose keys merge with the suite's), then the command's; tasks without any
    left out."""
    merged = {}
    for name in names:
        options = dict(suite.task_options(name, family) if suite else {})
        for key, value in run_wide.get(name, {}).items():
            options[key] = {**options.get(key, {}), **value} if key == "gen_kwargs" else value
        merged[name] = {**options, **given.get(name, {})}
    return {name: options for name, options in merged.items() if options}


def check_limit(limit: int | float | None) -> None:
    """A positive count of documents, or a fraction in (0, 1) of them."""
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0 \
            or (isinstance(limit, float) and limit >= 1 and not limit.is_integer()):
        raise HarnessError(f"--limit must be a positive integer or a fraction below 1, got {limit}")


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise HarnessError(f"output path '{output}' is a file, not a directory")


def served_dtype(dtype: str | None) -> str:
    """A served model's weights are in whatever dtype the server loaded them: ``served``."""
    if dtype is not None:
        raise HarnessError("--dtype: a served model runs in the server's dtype (set it where the server starts)")
    return "served"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise HarnessError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    return dtype


def check_device(device: str | None) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``); None:
    ``cuda`` when present, else ``cpu``."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise HarnessError(f"unknown --device '{device}' (use cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError(f"--device {device}: no CUDA device is available here")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise HarnessError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise HarnessError(f"--device {device}: MPS is not available here")
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise HarnessError(f"unsupported --device '{device}' (use cpu, cuda, cuda:N or mps)")
    return device
