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
from harness.models.settings import ARSettings, DiffusionGemmaSettings, DiffusionSettings, settings_for

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class RunConfig:
    """What was asked for (names, raw ``model_args`` and ``task_options``)."""

    model: str
    tasks: list[str]
    suite: str | None = None
    limit: int | None = None
    seed: int = 1234
    batch_size: int | str = 16
    device: str = "cpu"
    dtype: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    data_dir: Path | None = None
    output: Path = Path("runs")


@dataclass(frozen=True)
class RunPlan:
    """A resolved run. ``model_args`` are the merged raw arguments (part of the run's identity);
    ``settings`` their typed, validated form, which builds the backend."""

    model: str
    card: ModelCard
    family: str  # ar | diffusion | diffusion_gemma (the key of a suite's model_args)
    settings: DiffusionSettings | ARSettings | DiffusionGemmaSettings
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

    def identity(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """What determines a run's numbers; its hash is the run id."""
        stable = {k: v for k, v in fingerprint.items() if k not in ("batch_size",)}
        return {"model": self.model, "fingerprint": stable, "tasks": list(self.tasks), "limit": self.limit,
                "seed": self.seed, "model_args": self.model_args, "task_options": self.task_options}

    def recorded(self) -> dict[str, Any]:
        """The plan as stored with the run (JSON-ready)."""
        return {"model": self.model, "tasks": list(self.tasks), "suite": self.suite, "limit": self.limit,
                "seed": self.seed, "batch_size": self.batch_size, "device": self.device, "dtype": self.dtype,
                "model_args": self.model_args, "task_options": self.task_options,
                "data_dir": None if self.data_dir is None else str(self.data_dir), "output": str(self.output)}


def plan_run(config: RunConfig, card: ModelCard | None = None, *, require_tasks: bool = True) -> RunPlan:
    """Resolve and validate ``config`` (see the module docstring); ``card``: already resolved;
    ``require_tasks=False`` for a plan that only builds the model (the throughput bench)."""
    from harness.catalog import catalog
    from harness.models.batching import parse_batch_size
    from harness.models.factory import card_model_args, resolve_card

    if config.limit is not None and config.limit < 1:
        raise HarnessError(f"--limit must be a positive integer, got {config.limit}")
    check_output_dir(config.output)
    card = card or resolve_card(config.model)
    family = card.backend if card.backend in ("diffusion", "diffusion_gemma") else "ar"
    suite = catalog().suites.get(config.suite) if config.suite else None
    names = list(dict.fromkeys([*(suite.tasks if suite else []), *config.tasks]))
    if not names and require_tasks:
        raise HarnessError("nothing to run: give --tasks and/or --suite")
    for name in names:
        catalog().tasks.get(name)
    if card.backend == "diffusion_gemma":
        from harness.models.diffusion_gemma import check_tasks

        check_tasks(names)  # no likelihoods: refused before any weights load
    model_args = {**(suite.model_args.get(family, {}) if suite else {}), **config.model_args}
    settings = settings_for(card.backend, {**card_model_args(card), **model_args})
    parse_batch_size(config.batch_size)
    return RunPlan(model=config.model, card=card, family=family, settings=settings, model_args=model_args,
                   tasks=tuple(names), task_options=task_options(names, suite, family, config.task_options),
                   suite=config.suite, limit=config.limit if config.limit is not None else (suite.limit if suite else None),
                   seed=config.seed, batch_size=config.batch_size, device=check_device(config.device),
                   dtype=check_dtype(config.dtype or card.dtype), data_dir=config.data_dir, output=config.output)


def task_options(names: list[str], suite: SuiteSpec | None, family: str,
                 given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task: the suite's options for this family, then the command's; tasks without any left out."""
    merged = {name: {**(suite.task_options(name, family) if suite else {}), **given.get(name, {})} for name in names}
    return {name: options for name, options in merged.items() if options}


def check_output_dir(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise HarnessError(f"output path '{output}' is a file, not a directory")


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise HarnessError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    return dtype


def check_device(device: str) -> str:
    """A device torch knows and this machine has (``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

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
