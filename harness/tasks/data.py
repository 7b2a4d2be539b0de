"""One loader for task data: local files under a data directory first, the Hugging Face hub otherwise."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness.errors import HarnessError


def resolve_data_dir(value: str | os.PathLike | None) -> Path | None:
    """--data-dir, else $HARNESS_DATA_DIR, else None (read from the hub)."""
    raw = value if value is not None else os.environ.get("HARNESS_DATA_DIR")
    if not raw:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise HarnessError(f"data directory '{path}' does not exist")
    return path


def local_paths(files: dict[str, str], data_dir: Path | None, task: str, hub: dict[str, Any]) -> dict[str, Path] | None:
    """The task's local files, or None when the hub should be used instead."""
    if data_dir is None:
        if not hub:
            raise HarnessError(f"task '{task}' reads local files only: pass --data-dir (or set HARNESS_DATA_DIR) "
                               f"to a folder holding {', '.join(files.values())}")
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise HarnessError(f"task '{task}' needs --data-dir (or HARNESS_DATA_DIR) when offline: no local data "
                               f"was given and the hub ({hub.get('path')}) cannot be reached")
        return None
    paths = {key: data_dir / rel for key, rel in files.items()}
    for path in paths.values():
        if not path.exists():
            online = f", or unset --data-dir to read {hub['path']} from the hub" if hub else ""
            raise HarnessError(f"data file '{path}' for task '{task}' not found; point --data-dir at a folder "
                               f"holding {path.relative_to(data_dir)}{online}")
    return paths


def hub_rows(hub: dict[str, Any], task: str) -> list[dict[str, Any]]:
    """Rows of a hub dataset through the optional `datasets` package."""
    try:
        import datasets
    except ImportError as exc:
        raise HarnessError(f"reading task '{task}' from the hub needs the 'datasets' package "
                           f"(pip install 'dlm-harness[eval]'), or pass --data-dir") from exc
    args = {k: v for k, v in hub.items() if k in ("path", "name", "split", "revision")}
    try:
        return list(datasets.load_dataset(**args))
    except Exception as exc:  # the hub raises many types; all mean the same to the user
        raise HarnessError(f"cannot read {args} from the hub for task '{task}': {str(exc).splitlines()[0]}") from exc
