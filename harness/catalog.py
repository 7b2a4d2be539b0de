"""The registries of tasks, suites and model cards, discovered from the YAML files in the repo."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.config import (BASELINES_DIR, SUITES_DIR, ModelCard, SuiteSpec, TaskSpec, load_model_card,
                            load_suite_spec, load_task_spec)
from harness.errors import HarnessError, unknown_name
from harness.registry import Registry, import_string


class Catalog:
    def __init__(self, suites_dir: Path = SUITES_DIR, baselines_dir: Path = BASELINES_DIR):
        self.tasks: Registry[TaskSpec] = Registry("task")
        self.suites: Registry[SuiteSpec] = Registry("suite")
        self.models: Registry[ModelCard] = Registry("model")
        for path in sorted((suites_dir / "tasks").glob("*.yaml")):
            self._add(self.tasks, load_task_spec(path), path)
        for path in sorted(suites_dir.glob("*.yaml")):
            self._add(self.suites, load_suite_spec(path), path)
        for path in sorted((baselines_dir / "models").glob("*.yaml")):
            self._add(self.models, load_model_card(path), path)
        for suite in (self.suites.get(n) for n in self.suites):
            for task in suite.tasks:
                if task not in self.tasks:
                    raise HarnessError(f"{suite.path}: {unknown_name('task', task, self.tasks.names())}")

    @staticmethod
    def _add(registry: Registry, spec: Any, path: Path) -> None:
        if spec.name in registry:
            raise HarnessError(f"{path}: {registry.kind} '{spec.name}' is defined twice "
                               f"(also in {registry.get(spec.name).path})")
        registry.register(spec.name, spec)

    def task(self, name: str, data_dir: Path | None, options: dict[str, Any] | None = None):
        spec = self.tasks.get(name)
        try:
            cls = import_string(spec.builder)
        except (ImportError, AttributeError) as exc:
            raise HarnessError(f"{spec.path}: builder '{spec.builder}' cannot be imported ({exc})") from exc
        return cls(spec, data_dir, options)

    def expand(self, tasks: list[str], suite: str | None) -> tuple[list[str], SuiteSpec | None]:
        """Task names from --tasks and --suite, in order, without duplicates."""
        spec = self.suites.get(suite) if suite else None
        names = list(spec.tasks if spec else []) + tasks
        for name in names:
            self.tasks.get(name)
        return list(dict.fromkeys(names)), spec


@lru_cache(maxsize=1)
def catalog() -> Catalog:
    return Catalog()
