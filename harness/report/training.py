"""An adapted checkpoint's training loss curve beside its evaluation (``harness.report.names`` finds the log)."""
from __future__ import annotations

from typing import Any

from harness.report import Figure, Section, Table
from harness.report.collect import Cell
from harness.report.format import fmt, number
from harness.report.names import training_log
from harness.report.plots import png, pyplot
from harness.report.tables import primary

MAX_ROWS = 60  # rows of the loss table; longer logs are thinned evenly (first and last step kept)


def thinned(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(log) <= MAX_ROWS:
        return log
    every = (len(log) - 1) / (MAX_ROWS - 1)
    return [log[round(i * every)] for i in range(MAX_ROWS)]


def loss_figure(model: str, log: list[dict[str, Any]]) -> Figure:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    steps = [row["step"] for row in log]
    for key, label in (("loss", "loss (CE/t per masked token)"), ("unweighted_loss", "masked CE")):
        if all(isinstance(row.get(key), (int, float)) for row in log):
            ax.plot(steps, [row[key] for row in log], lw=1.2, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.legend(frameon=False, fontsize=8)
    first, last = log[0], log[-1]
    tokens = f", {number(last['tokens_seen'], 0)} tokens seen" if isinstance(last.get("tokens_seen"), int) else ""
    rows = [[str(r["step"]), fmt(r["loss"], None, 1, 3), fmt(r.get("unweighted_loss"), None, 1, 3),
             fmt(r.get("lr"), None, 1, 6)] for r in thinned(log)]
    title = f"Training loss of {model}"
    return Figure(f"loss-{model}", title, png(fig),
                  f"Adaptation log: steps {first['step']}–{last['step']}{tokens}; loss {first['loss']:.3f} → "
                  f"{last['loss']:.3f} (first and last logged step).",
                  Table(title, ["Step", "Loss", "Masked CE", "lr"], rows,
                        settings=[] if len(log) <= MAX_ROWS else [f"{MAX_ROWS} of {len(log)} logged steps"]))


def evaluation_table(model: str, cells: list[Cell]) -> Table:
    rows = [[c.task, c.spec.label, fmt(c.value, c.stderr, c.spec.scale), str(c.n), c.scoring, c.run_id]
            for c in primary(cells)]
    return Table(f"Evaluation of {model}", ["Task", "Metric", "Value", "n", "Scoring", "Run"], rows)


def training_sections(cells: list[Cell], figures: bool) -> list[Section]:
    """One section per adapted checkpoint with a training log: its loss curve and its evaluation."""
    sections = []
    for weights in dict.fromkeys(str(c.fingerprint.get("weights")) for c in cells if c.family == "DLM"):
        mine = [c for c in cells if str(c.fingerprint.get("weights")) == weights]
        log = training_log(mine[0].fingerprint)
        if not log:
            continue
        model = mine[0].model
        sections.append(Section(f"Adapted checkpoint {model}", tables=[evaluation_table(model, mine)],
                                figures=[loss_figure(model, log)] if figures else []))
    return sections
