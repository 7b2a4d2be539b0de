"""Adapt an AR causal LM into a masked diffusion LM (DiffuGPT / DiffuLLaMA, arXiv 2410.17891, Alg. 1).

One recipe, read top to bottom: ``setup`` (output directory, model + [MASK] token, data, optimizer,
resume), ``train`` (the loop), ``train_step`` (one optimizer step over the global batch),
``save_checkpoint`` (atomic HF directory + diffusion_config.json + trainer_state.pt).

Runs on one CPU, one GPU or many processes through Hugging Face Accelerate (DDP, or FSDP from
the user's ``accelerate config``)::

    python -m harness.train --data corpus.txt --output runs/adapt --preset quick
    accelerate launch --num_processes 2 -m harness.train --data corpus.txt ...   # GPUs
    torchrun --nproc_per_node 2 -m harness.train --data corpus.txt ...           # CPUs (gloo)

(``accelerate launch --cpu`` starts a single process; on a CPU-only machine use torchrun or
``accelerate launch --multi_gpu --num_processes N``, which fall back to gloo.)

Output directory::

    run.json                 settings of the run (marks the directory as a harness run)
    train_log.jsonl          one line per logged step
    loss.png                 loss curve, written at the end
    checkpoint-{step}/       every checkpoint_every steps, newest keep_checkpoints kept
    final/                   the last step (its trainer_state.pt holds no optimizer state)
    each checkpoint: config.json, model.safetensors, tokenizer files, diffusion_config.json,
                     trainer_state.pt (optimizer, scheduler, data position, step, elapsed time)

A checkpoint is written under ``.tmp-{name}`` and renamed into place, so a killed run never
leaves a half checkpoint; ``--resume`` continues from the complete checkpoint with the highest
step. All randomness (data order, masking, attention annealing, dropout) is drawn from
generators seeded by (seed, step), so no RNG state needs restoring and the process count does
not change the global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from harness.env import git_sha
from harness.errors import HarnessError
from harness.models.loading import load_causal_lm
from harness.train.blocks import (read_index, sample_block_noise, takes_logits_to_keep, two_stream_logits,
                                  two_stream_mask)
from harness.train.checkpoints import (DIFFUSION_CONFIG, TMP_PREFIX, TRAINER_STATE, TRASH_PREFIX, checkpoint_step,
                                       latest_checkpoint, plot_loss, publish, remove_dir)
from harness.train.config import RUN_CONTROLS, TrainConfig
from harness.train.data import DataOrder, read_source, tokenise
from harness.train.objective import (ATTENTION, DROPOUT, LOSS_NORMALISATION, NOISE, anneal_ratio,
                                     attention_mask, generator, mask_tokens, masked_losses,
                                     protected_positions, sample_noise, stream_seed)

MASK_TOKEN = "<|mask|>"
RUN_FILE, LOG_FILE, PLOT_FILE = "run.json", "train_log.jsonl", "loss.png"


# ----------------------------------------------------------------------------- model helpers

def check_causal_lm(weights: str, seq_len: int) -> None:
    """Refuse encoders and seq_len beyond the model's context before loading any weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(weights, local_files_only=Path(weights).exists())
    except (OSError, ValueError, KeyError) as exc:
        raise HarnessError(f"cannot read a model config from '{weights}': {str(exc).splitlines()[0]}") from exc
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False) or (
            architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        raise HarnessError(f"'{weights}' is not a causal LM ({config.model_type}: "
                           f"{', '.join(architectures) or 'encoder-decoder'}); adaptation needs a decoder-only model")
    context = getattr(config, "max_position_embeddings", None)
    if context and seq_len > context:
        raise HarnessError(f"seq-len {seq_len} exceeds the context of '{weights}' ({context} tokens)")


def add_mask_token(model, tokenizer) -> int:
    """Give the tokenizer a [MASK] token if it has none and make room for it in the embeddings."""
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    mask_id = int(tokenizer.mask_token_id)
    if mask_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    model.config.mask_token_id = mask_id
    return mask_id


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine to 0 over the remaining steps, or constant."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# ----------------------------------------------------------------------------- the recipe

class AdaptRecipe:
    """Algorithm 1 of the paper with Accelerate for devices and processes; with ``block_size`` the
    block-diffusion recipe of ``harness.train.blocks`` (per-block noise, the 2L layout, its read rule)."""

    def __init__(self, config: TrainConfig, weights: str):
        self.cfg, self.weights = config, weights
        self.out = Path(config.output_dir)

    # --- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from rich.console import Console
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # keep weight-loading/saving bars out of the training display

        cfg = self.cfg
        # cpu=True on machines without an accelerator lets torchrun/accelerate start gloo processes.
        self.acc = Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no",
                               cpu=not torch.accelerator.is_available())
        self.console = Console(stderr=True, soft_wrap=True, quiet=not self.acc.is_main_process)
        self.world = self.acc.num_processes
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world
        self.mask_dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32

        check_causal_lm(self.weights, cfg.seq_len)
        source_texts = read_source(cfg.data, cfg.sft, cfg.max_examples)
        resume_from = self.check_output_dir()
        torch.manual_seed(cfg.seed)  # the new embedding rows are initialised identically everywhere
        model, self.tokenizer = load_causal_lm(str(resume_from or self.weights))
        self.mask_id = add_mask_token(model, self.tokenizer)
        model.train()

        self.data = tokenise(source_texts, self.tokenizer, cfg.seq_len, cfg.sft, cfg.max_tokens)
        self.order = DataOrder(len(self.data), cfg.seed)

        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if cfg.block_size:  # fixed for the run: the 2L mask, and which of the 2N outputs predicts each token
            self.block_attn = two_stream_mask(cfg.seq_len, cfg.block_size, cfg.batch_size, self.mask_dtype,
                                              self.acc.device)
            self.read = read_index(cfg.seq_len, cfg.block_size, cfg.shift, self.acc.device)
            self.keep_logits = takes_logits_to_keep(model)

        self.start_step, self.elapsed_before = 0, 0.0
        if resume_from:
            self.load_trainer_state(resume_from)
        self.init_output_dir(resume_from)
        n_params = sum(p.numel() for p in model.parameters())
        self.console.print(
            f"adapt: {cfg.base} ({n_params / 1e6:.1f}M params), mask id {self.mask_id}, "
            f"{len(self.data)} sequences of {cfg.seq_len} from {self.data.n_sources} "
            f"{'pairs' if cfg.sft else 'documents'}"
            + (f" ({self.data.n_dropped} too long, left out)" if self.data.n_dropped else "")
            + (f", block diffusion in blocks of {cfg.block_size}" if cfg.block_size else "")
            + f", global batch {self.global_batch} on {self.world} process(es) [{self.acc.device}]"
            + (f", resuming at step {self.start_step} from {resume_from.name}" if resume_from else ""))

    def check_output_dir(self) -> Path | None:
        """Refuse a directory that holds something else; with --resume return its latest checkpoint."""
        cfg, out = self.cfg, self.out
        if out.exists() and not out.is_dir():
            raise HarnessError(f"output '{out}' is a file")
        holds_run = (out / RUN_FILE).is_file()
        if out.is_dir() and any(out.iterdir()) and not holds_run:
            raise HarnessError(f"output directory '{out}' is not empty and holds no harness run; choose another")
        if holds_run and not (cfg.resume or cfg.overwrite):
            raise HarnessError(f"output directory '{out}' holds another run; "
                               "pass --resume to continue it or --overwrite to replace it")
        latest = latest_checkpoint(out) if cfg.resume else None
        if latest:
            self.check_same_run(latest)
        return latest

    def init_output_dir(self, resume_from: Path | None) -> None:
        """Once setup has succeeded: clear (--overwrite) or create the directory and mark it as a run."""
        out = self.out
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if self.cfg.overwrite and (out / RUN_FILE).is_file():
                shutil.rmtree(out)
            out.mkdir(parents=True, exist_ok=True)
            for stale in [*out.glob(f"{TMP_PREFIX}*"), *out.glob(f"{TRASH_PREFIX}*")]:
                shutil.rmtree(stale, ignore_errors=True)
            if resume_from is None:
                for old in (LOG_FILE, PLOT_FILE):
                    (out / old).unlink(missing_ok=True)
                (out / RUN_FILE).write_text(json.dumps(self.cfg.recipe(), indent=2))
            else:
                self.truncate_log(self.start_step)
        self.acc.wait_for_everyone()

    def check_same_run(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / DIFFUSION_CONFIG).read_text())["recipe"]
        now, default = self.cfg.recipe(), TrainConfig().recipe()  # a setting newer than the run: its default
        differ = [k for k in now if k not in RUN_CONTROLS and saved.get(k, default[k]) != now[k]]
        if differ:
            raise HarnessError(f"--resume with settings that differ from the run in '{self.out}': "
                               + ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in differ))
        saved_batch = saved["batch_size"] * saved["grad_accum"] * saved.get("world_size", 1)
        if saved_batch != self.global_batch:
            raise HarnessError(f"--resume needs the same global batch ({saved_batch} sequences), "
                               f"got {self.global_batch}")

    def truncate_log(self, step: int) -> None:
        """Drop log lines beyond the checkpoint we resume from."""
        log = self.out / LOG_FILE
        if log.is_file():
            keep = [line for line in log.read_text().splitlines() if line.strip()
                    and json.loads(line)["step"] <= step]
            log.write_text("".join(line + "\n" for line in keep))

    def load_trainer_state(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=False)
        self.start_step, self.elapsed_before = state["step"], state["elapsed_s"]
        if self.start_step >= self.cfg.steps:
            return  # a finished run: nothing left to train
        if self.fsdp:
            from accelerate.utils import load_fsdp_optimizer

            load_fsdp_optimizer(self.acc.state.fsdp_plugin, self.acc, self.optimizer, self.model,
                                str(checkpoint / "optimizer"))
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.FSDP

    # --- training ------------------------------------------------------------------------------
    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (loss, unweighted masked CE)."""
        cfg, acc = self.cfg, self.acc
        n, seq = self.global_batch, cfg.seq_len
        index = self.order.indices(step * n, n)
        clean, loss_start = self.data.input_ids[index], self.data.loss_start[index]
        t, u = self.noise(step)
        noisy, masked = mask_tokens(clean, t, u, protected_positions(loss_start, seq, cfg.shift), self.mask_id)
        n_masked = max(int(masked.sum()), 1)  # over the global batch: every process draws all of it
        attn = self.attention(step)
        torch.manual_seed(stream_seed(cfg.seed, step, DROPOUT))

        sums = torch.zeros(2, device=acc.device)
        for micro in range(cfg.grad_accum):
            first = (micro * self.world + acc.process_index) * cfg.batch_size
            rows = slice(first, first + cfg.batch_size)
            sync = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                logits = self.logits(noisy[rows].to(acc.device), clean[rows].to(acc.device), attn)
                weighted, plain = masked_losses(logits, clean[rows].to(acc.device), masked[rows].to(acc.device),
                                                t[rows], cfg.shift and not cfg.block_size)  # block: aligned
                # DDP/FSDP average gradients over processes: scale so the result is sum / n_masked.
                acc.backward(weighted * (self.world / n_masked))
            sums += torch.stack([weighted.detach(), plain.detach()])
        if cfg.grad_clip:
            acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, unweighted = (acc.reduce(sums, reduction="sum") / n_masked).tolist()
        return loss, unweighted

    def noise(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, u) of the global batch: t per sequence [n], or per token [n, N] (one rate per block)."""
        cfg, gen = self.cfg, generator(self.cfg.seed, step, NOISE)
        if cfg.block_size:
            return sample_block_noise(gen, self.global_batch, cfg.seq_len, cfg.block_size, cfg.min_t, cfg.stratified_t)
        return sample_noise(gen, self.global_batch, cfg.seq_len, cfg.min_t, cfg.stratified_t)

    def attention(self, step: int) -> torch.Tensor:
        """The step's additive 4-D mask: annealed [b, 1, N, N], or the fixed 2L block mask [b, 1, 2N, 2N]."""
        cfg, acc = self.cfg, self.acc
        if cfg.block_size:
            return self.block_attn
        return attention_mask(cfg.seq_len, cfg.batch_size, anneal_ratio(step, cfg.anneal, cfg.anneal_steps),
                              generator(cfg.seed, step, ATTENTION, acc.device), self.mask_dtype, acc.device)

    def logits(self, noisy: torch.Tensor, clean: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Logits [b, N, V] of one micro-batch; the block recipe's are aligned (row i predicts token i)."""
        if self.cfg.block_size:
            return two_stream_logits(self.model, noisy, clean, attn, self.read, self.keep_logits)
        return self.model(input_ids=noisy, attention_mask=attn, use_cache=False).logits

    def train(self) -> dict[str, Any]:
        """The loop: steps, logging, checkpoints, final save and loss plot."""
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        cfg = self.cfg
        tokens_per_step = self.global_batch * cfg.seq_len
        started = time.perf_counter()
        window: list[tuple[float, float, float]] = []  # (loss, unweighted, seconds) since the last log
        losses: list[float] = []
        progress = Progress(TextColumn("adapt"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=self.console, disable=not self.acc.is_main_process)
        with progress:
            task = progress.add_task("adapt", total=cfg.steps, completed=self.start_step, loss="-")
            for step in range(self.start_step, cfg.steps):
                lr = self.scheduler.get_last_lr()[0]
                tick = time.perf_counter()
                loss, unweighted = self.train_step(step)
                window.append((loss, unweighted, time.perf_counter() - tick))
                losses.append(loss)
                done = step + 1
                progress.update(task, completed=done, loss=f"{loss:.3f}")
                if done % cfg.log_every == 0 or done == cfg.steps:
                    self.log({"step": done,
                              "loss": sum(w[0] for w in window) / len(window),
                              "unweighted_loss": sum(w[1] for w in window) / len(window),
                              "lr": lr, "anneal_ratio": anneal_ratio(step, cfg.anneal, cfg.anneal_steps),
                              "tokens_seen": done * tokens_per_step,
                              "tokens_per_s": len(window) * tokens_per_step / sum(w[2] for w in window),
                              "elapsed_s": self.elapsed_before + time.perf_counter() - started})
                    window = []
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    self.save_checkpoint(done, f"checkpoint-{done}",
                                         self.elapsed_before + time.perf_counter() - started)
        if self.start_step < cfg.steps:
            self.save_checkpoint(cfg.steps, "final", self.elapsed_before + time.perf_counter() - started)
            if self.acc.is_main_process:
                plot_loss(self.out / LOG_FILE, self.out / PLOT_FILE)
        wall = time.perf_counter() - started
        self.console.print(f"adapt: {cfg.steps - self.start_step} steps in {wall:.1f}s"
                           + (f", loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else " (already done)")
                           + f"; model in {self.out / 'final'}")
        return {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "steps_run": len(losses), "wall_s": wall, "final": str(self.out / "final")}

    def log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, step: int, name: str, elapsed_s: float) -> Path:
        """Write ``name`` atomically: fill ``.tmp-name`` on all processes, then rename on the main one."""
        acc, cfg = self.acc, self.cfg
        tmp, target = self.out / f"{TMP_PREFIX}{name}", self.out / name
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # gathers FSDP shards; every process must call it
        resumable = step < cfg.steps  # final/ keeps no optimizer state (AdamW's is twice the weights)
        if self.fsdp and resumable:
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, self.optimizer, self.model, str(tmp / "optimizer"))
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(tmp, state_dict=state_dict)
            self.tokenizer.save_pretrained(tmp)
            recipe = {**cfg.recipe(), "world_size": self.world}
            diffusion = {"format": "dlm-harness", "version": 1, "kind": "shifted" if cfg.shift else "unshifted",
                         **({"block_size": cfg.block_size} if cfg.block_size else {}),  # block-causal on load
                         "mask_token_id": self.mask_id, "base_model": cfg.base,
                         "loss_normalisation": LOSS_NORMALISATION, "recipe": recipe,
                         "tokens_seen": step * self.global_batch * cfg.seq_len, "step": step, "git_sha": git_sha()}
            (tmp / DIFFUSION_CONFIG).write_text(json.dumps(diffusion, indent=2))
            torch.save({"step": step, "sequences_seen": step * self.global_batch, "elapsed_s": elapsed_s,
                        "optimizer": self.optimizer.state_dict() if resumable and not self.fsdp else None,
                        "scheduler": self.scheduler.state_dict(),
                        "rng": {"seed": cfg.seed, "scheme": "generators seeded by (seed, step, stream)"}},
                       tmp / TRAINER_STATE)
            publish(tmp, target)
            self.prune_checkpoints()
        acc.wait_for_everyone()
        return target

    def prune_checkpoints(self) -> None:
        """Keep the newest ``keep_checkpoints`` checkpoint-* directories."""
        kept = sorted((p for p in self.out.glob("checkpoint-*") if checkpoint_step(p) is not None),
                      key=checkpoint_step)
        for old in kept[:-self.cfg.keep_checkpoints]:
            remove_dir(old)


def run(config: TrainConfig, weights: str) -> dict[str, Any]:
    """Set up and train; returns a summary (first/last loss, steps run, wall time, final path)."""
    recipe = AdaptRecipe(config, weights)
    recipe.setup()
    return recipe.train()

