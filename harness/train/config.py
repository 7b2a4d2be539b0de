"""Settings of an adaptation run (AR causal LM -> masked diffusion LM) and the named presets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from harness.errors import HarnessError, unknown_name

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
# Settings that may differ on --resume: they steer one invocation, not the trajectory (of batch_size
# and grad_accum only the global batch, batch_size x grad_accum x processes, must match).
RUN_CONTROLS = ("output_dir", "resume", "overwrite", "checkpoint_every", "keep_checkpoints", "log_every",
                "batch_size", "grad_accum")
ANNEAL_WITH_BLOCKS = ("--anneal does not apply with --block-size: block diffusion attends block-causally "
                      "from step 0; drop --anneal")


@dataclass
class TrainConfig:
    """Every switch of the recipe; ``recipe`` in ``diffusion_config.json`` is ``asdict`` of this."""

    base: str = "smollm2-135m"  # model card name, directory or hub id of the AR model
    data: str = ""  # corpus (.txt / .jsonl / .json) or, with sft, prompt/response pairs
    output_dir: str = "runs/adapt"
    sft: bool = False  # prompt/response pairs: prompt never masked, loss on the response only
    steps: int = 100  # optimizer steps
    seq_len: int = 256
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine decays to 0 after warm-up; constant holds lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    shift: bool = True  # logits at i-1 predict a masked token i (DiffuGPT/DiffuLLaMA)
    anneal: bool = True  # causal -> full attention over anneal_steps; off = full attention from step 0
    anneal_steps: int = 50
    block_size: int = 0  # > 0: block diffusion (harness.train.blocks), blocks of this many positions; 0: off
    min_t: float = 1e-3  # t ~ U(min_t, 1)
    stratified_t: bool = False  # one t per 1/n stratum across the global batch: same mean, less noise
    precision: str = "fp32"  # fp32, or bf16 autocast with fp32 weights
    seed: int = 0
    max_tokens: int = 0  # stop reading the corpus after this many tokens (0: all)
    max_examples: int = 0  # keep the first N documents / SFT pairs (0: all)
    checkpoint_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2  # newest checkpoint-* directories kept; final/ is always kept
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False

    def validate(self) -> None:
        """Raise HarnessError on settings that cannot run."""
        positive = ("steps", "seq_len", "batch_size", "grad_accum", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise HarnessError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "anneal_steps", "checkpoint_every", "max_tokens", "max_examples"):
            if getattr(self, name) < 0:
                raise HarnessError(f"{name.replace('_', '-')} must not be negative")
        if self.keep_checkpoints < 1:
            raise HarnessError("keep-checkpoints must be at least 1")
        if self.seq_len < 2:
            raise HarnessError("seq-len must be at least 2")
        if self.block_size < 0:
            raise HarnessError(f"block-size must be at least 1, got {self.block_size}")
        if self.block_size and self.seq_len % self.block_size:
            raise HarnessError(f"block-size {self.block_size} does not divide seq-len {self.seq_len}")
        if self.block_size and self.anneal:
            raise HarnessError(ANNEAL_WITH_BLOCKS)
        if self.schedule not in SCHEDULES:
            raise unknown_name("schedule", self.schedule, SCHEDULES)
        if self.precision not in PRECISIONS:
            raise unknown_name("precision", self.precision, PRECISIONS)
        if not 0 < self.lr < 1:
            raise HarnessError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 < self.min_t < 1:
            raise HarnessError(f"min-t must be in (0, 1), got {self.min_t}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise HarnessError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise HarnessError("grad-clip and weight-decay must not be negative")
        if not self.data:
            raise HarnessError("no training data given (--data)")
        if self.resume and self.overwrite:
            raise HarnessError("--resume and --overwrite exclude each other")

    def recipe(self) -> dict[str, Any]:
        """JSON-ready settings, as stored in checkpoints."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out


PRESETS: dict[str, dict[str, Any]] = {
    # ~5 minutes on an idle 2-core CPU with SmolLM2-135M: the adaptation loss visibly falls
    # (stratified t keeps a 4-sequence batch's loss readable).
    "quick": dict(steps=60, seq_len=128, batch_size=4, grad_accum=1, lr=3e-4, warmup_steps=5,
                  schedule="cosine", anneal=True, anneal_steps=30, weight_decay=0.0, grad_clip=1.0,
                  stratified_t=True, precision="fp32", checkpoint_every=0, keep_checkpoints=1,
                  log_every=1),
    # The paper presets fix the optimisation recipe, not the budget: set --steps, --batch-size and
    # --grad-accum for your token budget and GPUs (DiffuGPT saw 30B FineWeb tokens).
    # DiffuGPT (arXiv 2410.17891): AdamW, lr 3e-4 cosine, 2K warm-up, 10K attention-annealing steps,
    # sequence length 1024, bf16 on GPUs.
    "paper": dict(seq_len=1024, lr=3e-4, schedule="cosine", warmup_steps=2000, anneal=True,
                  anneal_steps=10_000, precision="bf16", checkpoint_every=1000, keep_checkpoints=2,
                  log_every=10),
    # DiffuLLaMA: constant lr 2e-5, AdamW (0.9, 0.95), weight decay 0.1, grad accumulation 4,
    # sequence length 2048, no attention annealing (full attention from step 0).
    "paper-diffullama": dict(seq_len=2048, lr=2e-5, schedule="constant", warmup_steps=0,
                             betas=(0.9, 0.95), weight_decay=0.1, grad_accum=4, anneal=False,
                             anneal_steps=0, precision="bf16", checkpoint_every=1000,
                             keep_checkpoints=2, log_every=10),
}


def build_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset's values, then every override that is not None."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise unknown_name("preset", preset, PRESETS)
        values.update(PRESETS[preset])
    values.update({k: v for k, v in overrides.items() if v is not None})
    if preset is not None and "steps" not in values:
        raise HarnessError(f"preset '{preset}' fixes the recipe, not the budget: give --steps (and --batch-size, "
                           "--grad-accum) for your token budget")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise HarnessError(f"unknown training settings: {', '.join(unknown)}")
    if values.get("block_size"):  # no annealing in block diffusion: a preset's or the default's is switched off
        if overrides.get("anneal"):
            raise HarnessError(ANNEAL_WITH_BLOCKS)
        values["anneal"] = False
    if "betas" in values:
        values["betas"] = tuple(float(b) for b in values["betas"])
    config = TrainConfig(**values)
    config.validate()
    return config
