"""The Python API: ``harness.evaluate(...)``, lm-eval's ``simple_evaluate`` for the harness.

It plans and runs exactly what ``harness run`` does (same store, same run ids, same files) and
returns the results.json payload.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def evaluate(model: str, tasks: Sequence[str] | str, *, limit: int | float | None = None,
             model_args: dict[str, Any] | str | None = None, num_fewshot: int | None = None,
             batch_size: int | str = 16, device: str | None = None, dtype: str | None = None, seed: int = 1234,
             apply_chat_template: bool | str = False, system_instruction: str | None = None,
             fewshot_as_multiturn: bool = False, gen_kwargs: dict[str, Any] | None = None,
             task_options: dict[str, dict[str, Any]] | None = None, data_dir: str | Path | None = None,
             output_path: str | Path = "runs", use_cache: bool = True,
             include_path: Sequence[str | Path] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` (a card name, checkpoint directory or hub id) on ``tasks`` (task or suite
    names, a list or a comma-separated string) and return the results dict of ``results.json``.

    The arguments mean what the CLI's options of the same names mean; ``model_args`` may be a dict
    or lm-eval's ``"k=v,..."`` string, ``apply_chat_template`` True for the tokenizer's template or
    the name of one of its templates."""
    from harness.catalog import add_include_paths
    from harness.models.factory import parse_model_args
    from harness.plan import RunConfig
    from harness.runner import evaluate as run
    from harness.tasks.data import resolve_data_dir

    if include_path:
        add_include_paths([Path(p) for p in include_path])
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    args = parse_model_args(model_args) if isinstance(model_args, str) or model_args is None else dict(model_args)
    template = "default" if apply_chat_template is True else apply_chat_template or None
    config = RunConfig(model=model, tasks=[n for n in names if n], limit=limit, seed=seed, batch_size=batch_size,
                       device=device, dtype=dtype, model_args=args, task_options=dict(task_options or {}),
                       data_dir=resolve_data_dir(data_dir), output=Path(output_path), num_fewshot=num_fewshot,
                       gen_kwargs=dict(gen_kwargs or {}), chat_template=template,
                       system_instruction=system_instruction, fewshot_as_multiturn=fewshot_as_multiturn,
                       use_cache=use_cache)
    return run(config)
