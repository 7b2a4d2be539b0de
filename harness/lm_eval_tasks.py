"""lm-eval's own tasks, under their own names, on the harness's local data: a folder for ``--include_path``.

For each task below whose local files exist, the folder holds ``<task>/<task>.yaml``: an
``include:`` of lm-eval's installed config for that task, overriding only where the documents come
from (``dataset_path: json``, ``dataset_name: null``, ``dataset_kwargs.data_files``), plus
``<task>/<split>.jsonl`` where the local schema differs from the hub's (TriviaQA, PIQA, Social
IQa: converted rows, same documents in the same order). Two more keys are set: ``tag: []``, because
a tag in an include path replaces lm-eval's built-in tag of that name (``math_word_problems`` would
then hold gsm8k alone), and ``training_split: null`` where there is no local train split (lm-eval
reads its few-shot pool when it builds the task, and would fail; with ``--num_fewshot`` it then draws
from the evaluated split, its documented fallback). lm-eval 0.4.13's TaskManager indexes its own
tasks first and the include path after, and a later path overrides an earlier one
(``lm_eval/tasks/manager.py``, ``_index.py``), so these configs win over the hub ones.

Tasks: ``triviaqa`` (the local file is llm-foundry's 3,000-question subsample of the validation
set, so numbers are not the full set's), ``gsm8k``, ``lambada_openai``, ``piqa``, ``social_iqa``,
``winogrande``. Not written: ``hellaswag`` (the local file is a derived text version, not lm-eval's
documents), and lm-eval tasks without a same-named harness task.

The folder lives in ``$HARNESS_CACHE_DIR`` (default ``~/.cache/dlm-harness``) under
``lm_eval_tasks/<hash>``, the hash of the data directory, its files' sizes and times, lm-eval's
version and location; a missing folder is written again (atomically, by renaming a finished one).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import typer
import yaml

from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.tasks.likelihood import read_jsonl

FORMAT = 1  # bump when the generated files change
Rows = Callable[..., list[dict[str, Any]]]


@dataclass(frozen=True)
class LocalTask:
    name: str  # lm-eval's task name
    config: str  # lm-eval's YAML, relative to lm_eval/tasks
    splits: dict[str, tuple[str, ...]]  # lm-eval split -> local files (relative to the data directory)
    convert: Rows | None = None  # the split's rows in lm-eval's schema; None: the one file as it is
    overrides: dict[str, Any] = field(default_factory=dict)


def labelled(rows_path: Path, labels_path: Path) -> list[tuple[dict[str, Any], str]]:
    rows, labels = read_jsonl(rows_path), labels_path.read_text(encoding="utf-8").split()
    if len(rows) != len(labels):
        raise HarnessError(f"{rows_path} has {len(rows)} rows but {labels_path} {len(labels)} labels")
    return list(zip(rows, labels))


def triviaqa_rows(path: Path) -> list[dict[str, Any]]:
    """llm-foundry's {context: "Question: …\\nAnswer:", answer, aliases} -> {question, answer: {aliases, value}}."""
    rows = []
    for row in read_jsonl(path):
        found = re.fullmatch(r"Question: (.*)\nAnswer:", row["context"], flags=re.S)
        if not found:
            raise HarnessError(f"{path}: unexpected context {row['context'][:60]!r}")
        rows.append({"question": found.group(1), "answer": {"aliases": row["aliases"], "value": row["answer"]}})
    return rows


def piqa_rows(rows: Path, labels: Path) -> list[dict[str, Any]]:
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)}
            for r, label in labelled(rows, labels)]


def siqa_rows(rows: Path, labels: Path) -> list[dict[str, Any]]:
    keys = ("context", "question", "answerA", "answerB", "answerC")
    return [{**{k: r[k] for k in keys}, "label": label} for r, label in labelled(rows, labels)]


NO_TRAIN = {"training_split": None}
TASKS = (
    LocalTask("triviaqa", "triviaqa/default.yaml", {"validation": ("triviaqa/triviaqa_sm_sub.jsonl",)},
              triviaqa_rows, NO_TRAIN),
    LocalTask("gsm8k", "gsm8k/gsm8k.yaml", {"train": ("gsm8k/train.jsonl",), "test": ("gsm8k/test.jsonl",)}),
    LocalTask("lambada_openai", "lambada/lambada_openai.yaml", {"test": ("lambada/lambada_test.jsonl",)}),
    LocalTask("piqa", "piqa/piqa.yaml", {"validation": ("piqa/valid.jsonl", "piqa/valid-labels.lst")},
              piqa_rows, NO_TRAIN),
    LocalTask("social_iqa", "siqa/siqa.yaml", {"validation": ("siqa/dev.jsonl", "siqa/dev-labels.lst")},
              siqa_rows, NO_TRAIN),
    LocalTask("winogrande", "winogrande/default.yaml",
              {"validation": ("winogrande/winogrande_xl_validation.jsonl",)}, None, NO_TRAIN),
)


def lm_eval_tasks_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError("lm-eval is not installed: pip install 'dlm-harness[eval]'")
    return Path(list(spec.submodule_search_locations)[0])


def cache_root() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR") or Path.home() / ".cache" / "dlm-harness").expanduser()


def available(data_dir: Path, lm_eval_dir: Path) -> list[LocalTask]:
    """The tasks whose local files and lm-eval config exist."""
    return [task for task in TASKS if (lm_eval_dir / task.config).is_file() and
            all((data_dir / f).is_file() for files in task.splits.values() for f in files)]


def task_folder(data_dir: Path) -> Path:
    """The folder of task YAMLs for ``data_dir`` (written if missing)."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise HarnessError(f"data directory '{data_dir}' does not exist")
    lm_eval_dir = lm_eval_tasks_dir()
    tasks = available(data_dir, lm_eval_dir)
    if not tasks:
        raise HarnessError(f"no lm-eval task data under '{data_dir}' (looked for "
                           f"{', '.join(f for t in TASKS for files in t.splits.values() for f in files)})")
    files = sorted({f for t in tasks for fs in t.splits.values() for f in fs})
    stats = {f: [(data_dir / f).stat().st_size, (data_dir / f).stat().st_mtime_ns] for f in files}
    key = stable_hash({"format": FORMAT, "data_dir": str(data_dir), "files": stats,
                       "lm_eval": metadata.version("lm_eval"), "lm_eval_tasks": str(lm_eval_dir)})
    folder = cache_root() / "lm_eval_tasks" / key
    if not folder.is_dir():
        write_folder(folder, data_dir, lm_eval_dir, tasks)
    return folder


def write_folder(folder: Path, data_dir: Path, lm_eval_dir: Path, tasks: Iterable[LocalTask]) -> None:
    """Write the task folder next to ``folder`` and rename it into place (another process may win)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for task in tasks:
            write_task(tmp / task.name, folder / task.name, data_dir, lm_eval_dir, task)
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_task(where: Path, final: Path, data_dir: Path, lm_eval_dir: Path, task: LocalTask) -> None:
    """``<task>.yaml`` (and converted splits) in ``where``; paths in the YAML point into ``final``."""
    where.mkdir(parents=True)
    data_files = {}
    for split, files in task.splits.items():
        if task.convert is None:
            data_files[split] = str(data_dir / files[0])
            continue
        rows = task.convert(*(data_dir / f for f in files))
        with open(where / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        data_files[split] = str(final / f"{split}.jsonl")
    config = {"include": str(lm_eval_dir / task.config), "tag": [], "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": data_files}, **task.overrides}
    header = (f"# lm-eval's {task.name} on the local files of {data_dir} (written by harness.lm_eval_tasks):\n"
              f"# lm-eval's own config, only the documents' source overridden.\n")
    (where / f"{task.name}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def lm_eval_argv(argv: list[str], env_data_dir: str | None) -> list[str]:
    """``harness lm-eval`` arguments for lm-eval: ``--data-dir`` removed, and ``--include_path`` of the
    task folder added when a data directory is known (``--data-dir``, else ``env_data_dir``)."""
    args, data_dir, explicit = [], None, False
    items = iter(argv)
    for arg in items:
        if arg == "--data-dir":
            data_dir, explicit = next(items, None), True
            if data_dir is None:
                raise HarnessError("--data-dir needs a folder")
        elif arg.startswith("--data-dir="):
            data_dir, explicit = arg.split("=", 1)[1], True
        else:
            args.append(arg)
    data_dir = data_dir or env_data_dir
    if not data_dir or not args or {"-h", "--help"} & set(args):
        return args
    if any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        if explicit:
            raise HarnessError("lm-eval takes one --include_path: give it or --data-dir, not both (`harness "
                               "lm-eval-tasks --data-dir DIR` prints the folder of local tasks)")
        print(f"note: --include_path given, so lm-eval's tasks on the local data of $HARNESS_DATA_DIR "
              f"({data_dir}) are not added", file=sys.stderr)
        return args
    return [*args, "--include_path", str(task_folder(Path(data_dir)))]


def lm_eval_tasks(data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                                           help="Local data folder (or $HARNESS_DATA_DIR).")) -> None:
    """Print the folder of lm-eval task YAMLs on the local data (for `lm_eval --include_path`)."""
    chosen = data_dir or os.environ.get("HARNESS_DATA_DIR")
    if not chosen:
        raise HarnessError("give --data-dir (or set HARNESS_DATA_DIR)")
    typer.echo(str(task_folder(Path(chosen))))
