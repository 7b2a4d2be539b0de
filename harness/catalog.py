"""The registries of tasks, suites and model cards, discovered from YAML directories.

Where the YAML comes from, in this order:

1. the package's own tree, ``harness/resources/`` (shipped in the wheel; found next to this module);
2. each directory in ``$HARNESS_INCLUDE_PATH`` (``os.pathsep``-separated, empty entries skipped);
3. each directory given to :func:`add_include_paths` (the CLI's repeatable ``--include-path DIR``).

An include directory has the layout of the built-in tree::

    DIR/tasks/*.yaml    tasks        (TaskSpec keys: name, builder, description, data, hub, options)
    DIR/suites/*.yaml   suites       (SuiteSpec keys: name, tasks, limit, model_args, kind, options, seeds)
    DIR/models/*.yaml   model cards  (ModelCard keys: name, backend, weights, dtype, diffusion, ...)

(``*.yml`` is read too; any of the three folders may be absent, but not all of them; ``papers/`` is
read from the package only.) A suite may name tasks from any directory. An include directory that
does not exist, or holds none of the three folders, is a HarnessError.

Names are unique: a user file defining a name that a built-in (or an earlier include directory)
already defines is a HarnessError naming both files. There are no overrides; copy the file under a
new name instead.

A file that cannot be loaded (malformed YAML, unknown or missing keys, an invalid value, a suite
naming a task that does not exist) does not break the catalog: it is recorded as broken under its
file stem (and its ``name:``, when that could be read), is not listed, and :func:`catalog` prints
one line per such file on stderr, once per process (``warning: FILE:LINE: problem ...; skipped``).
A command that asks for a broken name gets the file's own error as its HarnessError (exit code 2).
"""
from __future__ import annotations

import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from harness.config import (RESOURCES_DIR, ModelCard, SuiteSpec, TaskSpec, load_model_card, load_suite_spec,
                            load_task_spec, read_yaml)
from harness.errors import HarnessError, unknown_name
from harness.registry import Registry, import_string

T = TypeVar("T")
INCLUDE_ENV = "HARNESS_INCLUDE_PATH"
FOLDERS = ("tasks", "suites", "models")
_added: list[Path] = []  # from add_include_paths, in order
_warned: set[str] = set()


class SpecRegistry(Registry[T]):
    """A registry that also remembers the files that failed to load, by name.

    Broken names are not listed (iteration, ``names()``), but ``name in registry`` is true for them
    and ``get`` raises the file's own error, so a command that uses one fails with that message.
    """

    def __init__(self, kind: str):
        super().__init__(kind)
        self.broken: dict[str, HarnessError] = {}

    def get(self, name: str) -> T:
        if name in self.broken:
            raise HarnessError(str(self.broken[name]))
        return super().get(name)

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or name in self.broken

    def loaded(self, name: str) -> bool:
        return super().__contains__(name)

    def mark_broken(self, name: str, error: HarnessError) -> None:
        self._items.pop(name, None)
        self.broken[name] = error


def yaml_files(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def include_dir(path: Path | str, source: str = "--include-path") -> Path:
    """An include directory, checked: it exists and holds at least one of tasks/, suites/, models/."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise HarnessError(f"{source}: include directory {folder} does not exist")
    if not folder.is_dir():
        raise HarnessError(f"{source}: include path {folder} is not a directory")
    if not any((folder / name).is_dir() for name in FOLDERS):
        raise HarnessError(f"{source}: include directory {folder} holds none of tasks/, suites/, models/ "
                           "(see harness.catalog for the layout)")
    return folder.resolve()


class Catalog:
    def __init__(self, include_paths: Iterable[Path | str] = (), builtin: Path | None = RESOURCES_DIR):
        self.tasks: SpecRegistry[TaskSpec] = SpecRegistry("task")
        self.suites: SpecRegistry[SuiteSpec] = SpecRegistry("suite")
        self.models: SpecRegistry[ModelCard] = SpecRegistry("model")
        self.problems: list[str] = []  # one line per file that failed to load
        roots = [Path(builtin).resolve()] if builtin is not None else []
        roots += [include_dir(p) for p in include_paths]
        self.roots: list[Path] = list(dict.fromkeys(roots))
        loaders: list[tuple[str, SpecRegistry, Callable[[Path], Any]]] = [
            ("tasks", self.tasks, load_task_spec), ("suites", self.suites, load_suite_spec),
            ("models", self.models, load_model_card)]
        for root in self.roots:
            for folder, registry, loader in loaders:
                for path in yaml_files(root / folder):
                    self._load(registry, loader, path)
        self._check_suites()

    def _load(self, registry: SpecRegistry, loader: Callable[[Path], Any], path: Path) -> None:
        try:
            spec = loader(path)
        except HarnessError as exc:
            self._broken(registry, _names_of(path), exc)
            return
        if registry.loaded(spec.name):
            raise HarnessError(f"{path}: {registry.kind} '{spec.name}' is defined twice (also in "
                               f"{registry.get(spec.name).path}); rename one of them")
        registry.broken.pop(spec.name, None)  # a broken file's stem never hides a good definition
        registry.register(spec.name, spec)

    def _broken(self, registry: SpecRegistry, names: Iterable[str], error: HarnessError,
                replace: bool = False) -> None:
        self.problems.append(f"{error}; skipped")
        for name in names:
            if replace or not registry.loaded(name):
                registry.mark_broken(name, error)

    def _check_suites(self) -> None:
        for name in self.suites.names():
            suite = self.suites.get(name)
            missing = [task for task in suite.tasks if task not in self.tasks]
            if missing:
                error = HarnessError(f"{suite.path}: {unknown_name('task', missing[0], self.tasks.names())}")
                self._broken(self.suites, [name], error, replace=True)

    def task_class(self, name: str) -> type:
        """The class that builds the task ``name``."""
        spec = self.tasks.get(name)
        try:
            return import_string(spec.builder)
        except (ImportError, AttributeError) as exc:
            raise HarnessError(f"{spec.path}: builder '{spec.builder}' cannot be imported ({exc})") from exc

    def task(self, name: str, data_dir: Path | None, options: dict[str, Any] | None = None):
        return self.task_class(name)(self.tasks.get(name), data_dir, options)


def _names_of(path: Path) -> list[str]:
    """The names a broken file may be asked for: its stem, and its ``name:`` when the YAML parses."""
    names = [path.stem]
    try:
        name = read_yaml(path).get("name")
    except HarnessError:
        return names
    return names + [name] if isinstance(name, str) and name != path.stem else names


def add_include_paths(paths: Iterable[Path | str] | Path | str) -> None:
    """Add user YAML directories (the CLI's ``--include-path``); later :func:`catalog` calls see them.

    Each directory is checked now: a missing one is a HarnessError. Adding a directory twice is a no-op.
    """
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        folder = include_dir(path)
        if folder not in _added:
            _added.append(folder)
    catalog_for.cache_clear()


def include_paths() -> list[Path]:
    """The include directories in effect: ``$HARNESS_INCLUDE_PATH``, then those added by the CLI."""
    env = [include_dir(p, f"${INCLUDE_ENV}") for p in os.environ.get(INCLUDE_ENV, "").split(os.pathsep) if p]
    return list(dict.fromkeys([*env, *_added]))


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


@lru_cache(maxsize=8)
def catalog_for(paths: tuple[Path, ...]) -> Catalog:
    """The catalog of the built-ins plus ``paths``, built once; its broken files are warned about."""
    built = Catalog(paths)
    for problem in built.problems:
        warn_once(problem)
    return built


def catalog() -> Catalog:
    """The process-wide catalog: built-ins, ``$HARNESS_INCLUDE_PATH`` and :func:`add_include_paths`."""
    return catalog_for(tuple(include_paths()))


catalog.cache_clear = catalog_for.cache_clear  # type: ignore[attr-defined]  # as when catalog was an lru_cache
