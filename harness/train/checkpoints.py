"""A trainer run's files on disk: complete checkpoints, atomic publishing and removal, the loss plot."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from harness.store import pause_point

DIFFUSION_CONFIG, TRAINER_STATE = "diffusion_config.json", "trainer_state.pt"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"


def checkpoint_step(path: Path) -> int | None:
    """Step of a complete checkpoint directory, else None."""
    try:
        return int(json.loads((path / DIFFUSION_CONFIG).read_text())["step"]) \
            if (path / TRAINER_STATE).is_file() else None
    except (OSError, ValueError, KeyError):
        return None


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint (``checkpoint-*`` or ``final``) with the highest step."""
    found = []
    for path in out.glob("*") if out.is_dir() else []:
        step = checkpoint_step(path) if path.name == "final" or path.name.startswith("checkpoint-") else None
        if step is not None:
            found.append((step, path.name == "final", path))
    return max(found, key=lambda f: f[:2])[2] if found else None


def remove_dir(path: Path) -> None:
    """Rename out of sight first, so a kill mid-delete leaves nothing that looks complete."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Rename the filled ``tmp`` to ``target`` (a kill before the rename leaves only a .tmp- folder)."""
    pause_point("checkpoint")
    if target.exists():
        remove_dir(target)
    os.replace(tmp, target)


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, for reading a noisy loss curve."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay**i))
    return out


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Loss curve of a train_log.jsonl (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in records]
    for key, label in (("loss", "loss (CE/t per masked token)"), ("unweighted_loss", "masked CE")):
        values = [r[key] for r in records]
        line, = ax.plot(steps, values, alpha=0.35, label=label)
        ax.plot(steps, ema(values), color=line.get_color(), label=f"{label}, EMA 0.9")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
