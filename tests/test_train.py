"""The adaptation trainer (AR -> masked diffusion LM) on a tiny random Llama written to tmp_path."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from training import assert_same_weights, cli_args, free_port, log, subprocess_env
from harness.errors import HarnessError
from harness.train import data as train_data
from harness.train.config import build_config
from harness.train.objective import (NOISE, LOSS_NORMALISATION, anneal_ratio, attention_mask, generator,
                                     mask_tokens, masked_losses, protected_positions, sample_noise)
from harness.train.recipe import add_mask_token, lr_factor, run

TINY = dict(steps=16, seq_len=32, batch_size=2, lr=3e-3, warmup_steps=2, anneal_steps=6, checkpoint_every=8,
            keep_checkpoints=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(model_dir: Path, corpus: Path, out: Path, **settings) -> dict:
    config = build_config(base=str(model_dir), data=str(corpus), output_dir=str(out), **{**TINY, **settings})
    return run(config, str(model_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, corpus) -> Path:
    """An uninterrupted 16-step run, the yardstick of the resume, kill and multi-process tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train(tiny_llama_dir, corpus, out)
    return out


# ----------------------------------------------------------------------------- objective

def test_masking_rate_follows_t():
    t, u = sample_noise(generator(0, 0, NOISE), 64, 4000, 1e-3)
    assert t.min() >= 1e-3 and t.max() <= 1
    _, masked = mask_tokens(torch.zeros(64, 4000, dtype=torch.long), t, u,
                            torch.zeros(64, 4000, dtype=torch.bool), mask_id=7)
    torch.testing.assert_close(masked.float().mean(1), t, atol=0.03, rtol=0)


def test_stratified_t_covers_every_stratum():
    t, _ = sample_noise(generator(0, 1, NOISE), 8, 4, 1e-3, stratified=True)
    assert sorted(((t - 1e-3) / (1 - 1e-3) * 8).floor().long().tolist()) == list(range(8))


def test_first_position_and_prompt_are_never_masked():
    ids = torch.arange(40).view(4, 10)
    ones = torch.ones(4)
    u = torch.zeros(4, 10)  # every unprotected token gets masked
    noisy, masked = mask_tokens(ids, ones, u, protected_positions(torch.zeros(4, dtype=torch.long), 10, True), 99)
    assert not masked[:, 0].any() and masked[:, 1:].all()
    assert (noisy[:, 0] == ids[:, 0]).all() and (noisy[:, 1:] == 99).all()
    _, unshifted = mask_tokens(ids, ones, u, protected_positions(torch.zeros(4, dtype=torch.long), 10, False), 99)
    assert unshifted.all()
    prompt = torch.tensor([3, 0, 5, 9])
    _, sft = mask_tokens(ids, ones, u, protected_positions(prompt, 10, False), 99)
    assert sft.sum(1).tolist() == [7, 10, 5, 1]


def test_shift_reads_the_logits_one_position_earlier():
    targets = torch.tensor([[1, 2, 3, 4, 5]])
    masked = torch.tensor([[False, True, False, True, True]])
    t = torch.tensor([0.5])
    at_previous = torch.full((1, 5, 8), -20.0)
    at_previous[0, torch.arange(4), targets[0, 1:]] = 20.0  # logits at j-1 name token j
    at_same = torch.full((1, 5, 8), -20.0)
    at_same[0, torch.arange(5), targets[0]] = 20.0  # logits at j name token j
    assert masked_losses(at_previous, targets, masked, t, shift=True)[1] < 1e-6
    assert masked_losses(at_same, targets, masked, t, shift=True)[1] > 10
    assert masked_losses(at_same, targets, masked, t, shift=False)[1] < 1e-6


def test_loss_weights_masked_ce_by_one_over_t():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 6, 11), torch.randint(0, 11, (3, 6))
    masked, t = torch.rand(3, 6) < 0.5, torch.tensor([0.2, 0.5, 0.9])
    masked[:, 0] = False
    weighted, plain = masked_losses(logits, targets, masked, t, shift=True)
    expected_w = expected_p = 0.0
    for b in range(3):
        for j in range(1, 6):
            if masked[b, j]:
                ce = F.cross_entropy(logits[b, j - 1], targets[b, j]).item()
                expected_w, expected_p = expected_w + ce / t[b].item(), expected_p + ce
    assert weighted.item() == pytest.approx(expected_w, rel=1e-5)
    assert plain.item() == pytest.approx(expected_p, rel=1e-5)


def test_annealed_attention_mask():
    n, low = 64, torch.finfo(torch.float32).min
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    at0 = attention_mask(n, 2, 0.0, None, torch.float32, "cpu")
    assert at0.shape == (2, 1, n, n)
    assert (at0[0, 0][causal] == 0).all() and (at0[0, 0][~causal] == low).all()
    half = attention_mask(n, 2, 0.5, torch.Generator().manual_seed(0), torch.float32, "cpu")[0, 0]
    assert (half[causal] == 0).all()
    assert (half[~causal] == 0).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert (attention_mask(n, 2, 1.0, None, torch.float32, "cpu") == 0).all()
    assert [anneal_ratio(s, True, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert anneal_ratio(0, False, 4) == 1.0


def test_lr_schedule():
    cfg = build_config(data="x", steps=10, warmup_steps=2, lr=1e-3)
    assert [lr_factor(s, cfg) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_factor(9, cfg) < 0.05
    cfg = build_config(data="x", steps=10, warmup_steps=0, schedule="constant")
    assert {lr_factor(s, cfg) for s in range(10)} == {1.0}


def test_presets_and_flags():
    assert build_config("quick", data="x").steps == 60
    assert build_config("quick", data="x", steps=5).steps == 5
    paper = build_config("paper-diffullama", data="x", steps=1000)
    assert (paper.lr, paper.betas, paper.weight_decay, paper.grad_accum, paper.anneal) == \
        (2e-5, (0.9, 0.95), 0.1, 4, False)
    with pytest.raises(HarnessError, match="unknown preset"):
        build_config("fast", data="x")
    with pytest.raises(HarnessError, match="give --steps"):
        build_config("paper", data="x")


# ----------------------------------------------------------------------------- data

def test_corpus_formats(tmp_path):
    (tmp_path / "lines.txt").write_text("one doc\n\ntwo\nstill two\n\n\nthree")
    assert train_data.read_documents(tmp_path / "lines.txt") == ["one doc", "two\nstill two", "three"]
    (tmp_path / "per_line.txt").write_text("a\nb\n")
    assert train_data.read_documents(tmp_path / "per_line.txt") == ["a", "b"]
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    (tmp_path / "c.json").write_text('[{"text": "x"}, {"text": "y"}]')
    assert train_data.read_documents(tmp_path / "c.jsonl") == train_data.read_documents(tmp_path / "c.json")


def test_packing_puts_eos_between_documents(tiny_tokenizer):
    docs = ["The quick brown fox", "lazy dog", "a clear stone"]
    data = train_data.pack_documents(docs, tiny_tokenizer, seq_len=4)
    eos = tiny_tokenizer.eos_token_id
    stream = [i for d in docs for i in tiny_tokenizer(d, add_special_tokens=False)["input_ids"] + [eos]]
    assert data.input_ids.flatten().tolist() == stream[: len(stream) // 4 * 4]
    assert (data.loss_start == 0).all()


def test_sft_pairs_protect_the_prompt(tmp_path, tiny_tokenizer):
    (tmp_path / "gsm.jsonl").write_text(json.dumps({"question": "How many eggs?", "answer": "Ten.\n#### 10"}) + "\n"
                                        + json.dumps({"question": "x" * 400, "answer": "too long"}) + "\n")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "1 2", "output": "3"}]))
    assert train_data.read_pairs(tmp_path / "alpaca.json") == [("Add\n1 2", "3")]
    data = train_data.tokenise(train_data.read_source(str(tmp_path / "gsm.jsonl"), sft=True), tiny_tokenizer, 32,
                               sft=True)
    prompt = tiny_tokenizer("How many eggs?\n", add_special_tokens=False)["input_ids"]
    assert (len(data), data.n_dropped) == (1, 1)
    assert data.loss_start.tolist() == [len(prompt)]
    assert data.input_ids[0, : len(prompt)].tolist() == prompt
    assert data.input_ids[0, -1].item() == tiny_tokenizer.eos_token_id


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = train_data.DataOrder(5, seed=3)
    first = order.indices(0, 10)
    assert sorted(first[:5].tolist()) == sorted(first[5:].tolist()) == list(range(5))
    assert torch.equal(train_data.DataOrder(5, seed=3).indices(4, 4), first[4:8])


# ----------------------------------------------------------------------------- training runs

def test_training_reduces_the_loss(reference):
    records = log(reference)
    assert [r["step"] for r in records] == list(range(1, 17))
    first = sum(r["unweighted_loss"] for r in records[:3]) / 3
    last = sum(r["unweighted_loss"] for r in records[-3:]) / 3
    assert last < first - 0.5
    assert records[-1]["tokens_seen"] == 16 * 2 * 32
    assert {"lr", "anneal_ratio", "tokens_per_s", "elapsed_s", "loss"} <= records[0].keys()
    assert (reference / "loss.png").stat().st_size > 0


def test_first_logged_loss_is_the_documented_objective(reference, tiny_llama_dir):
    """Recompute step 0 by hand on the base model: sum of CE/t over masked tokens / masked count."""
    from harness.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_llama_dir))
    torch.manual_seed(0)
    mask_id = add_mask_token(model, tok)
    cfg = build_config(base=str(tiny_llama_dir), data="x", **TINY)
    documents = train_data.read_source(json.loads((reference / "run.json").read_text())["data"], sft=False)
    blocks = train_data.tokenise(documents, tok, 32, sft=False)
    clean = blocks.input_ids[train_data.DataOrder(len(blocks), 0).indices(0, 2)]
    t, u = sample_noise(generator(0, 0, NOISE), 2, 32, cfg.min_t)
    noisy, masked = mask_tokens(clean, t, u, protected_positions(torch.zeros(2, dtype=torch.long), 32, True), mask_id)
    with torch.no_grad():
        logits = model(input_ids=noisy, attention_mask=attention_mask(32, 2, 0.0, None, torch.float32, "cpu")).logits
    weighted, plain = masked_losses(logits, clean, masked, t, shift=True)
    first = log(reference)[0]
    assert first["loss"] == pytest.approx(weighted.item() / masked.sum().item(), rel=1e-4)
    assert first["unweighted_loss"] == pytest.approx(plain.item() / masked.sum().item(), rel=1e-4)


def test_checkpoint_layout(reference, tiny_llama_dir):
    from harness.models.diffusion.formats import load_denoiser

    assert sorted(p.name for p in reference.iterdir()) == \
        ["checkpoint-8", "final", "loss.png", "run.json", "train_log.jsonl"]
    final = reference / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "diffusion_config.json", "trainer_state.pt"):
        assert (final / name).is_file(), name
    spec = json.loads((final / "diffusion_config.json").read_text())
    assert set(spec) == {"format", "version", "kind", "mask_token_id", "base_model", "loss_normalisation",
                         "recipe", "tokens_seen", "step", "git_sha"}
    assert (spec["format"], spec["version"], spec["kind"], spec["step"]) == ("dlm-harness", 1, "shifted", 16)
    assert spec["loss_normalisation"] == LOSS_NORMALISATION
    assert spec["base_model"] == str(tiny_llama_dir) and spec["tokens_seen"] == 16 * 2 * 32
    assert spec["recipe"]["seq_len"] == 32 and spec["recipe"]["shift"] is True
    denoiser = load_denoiser(str(final))
    assert denoiser.shifted and denoiser.mask_id == spec["mask_token_id"]
    assert denoiser.tokenizer.convert_ids_to_tokens(spec["mask_token_id"]) == "<|mask|>"
    state = torch.load(reference / "checkpoint-8" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 8 and state["sequences_seen"] == 16 and state["optimizer"]["state"]
    assert {"scheduler", "rng", "elapsed_s"} <= state.keys()
    assert torch.load(final / "trainer_state.pt", weights_only=False)["optimizer"] is None  # the run is over


def test_resume_matches_an_uninterrupted_run(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")  # as if stopped after checkpoint-8
    (out / ".tmp-checkpoint-12").mkdir()  # what a kill during a checkpoint write leaves behind
    train(tiny_llama_dir, corpus, out, resume=True)
    assert not (out / ".tmp-checkpoint-12").exists()
    assert [r["step"] for r in log(out)] == list(range(1, 17))
    assert_same_weights(out / "final", reference / "final", atol=0)


def test_resuming_a_finished_run_does_nothing(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "done"
    shutil.copytree(reference, out)
    assert train(tiny_llama_dir, corpus, out, resume=True)["steps_run"] == 0
    assert_same_weights(out / "final", reference / "final", atol=0)


def test_resume_refuses_other_settings(reference, tiny_llama_dir, corpus):
    with pytest.raises(HarnessError, match="lr"):
        train(tiny_llama_dir, corpus, reference, resume=True, lr=1e-3)


def test_grad_accumulation_matches_a_larger_micro_batch(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "accum"
    train(tiny_llama_dir, corpus, out, batch_size=1, grad_accum=2, checkpoint_every=0)
    assert_same_weights(out / "final", reference / "final", atol=1e-5)


SLOW_STEPS = """
import sys, time
from harness.train import recipe
step = recipe.AdaptRecipe.train_step
recipe.AdaptRecipe.train_step = lambda self, s: (time.sleep(0.3), step(self, s))[1]
sys.argv = ["adapt"] + sys.argv[1:]
from harness.train.command import main
main()
"""


def test_sigkill_then_resume_matches_an_uninterrupted_run(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS,
                             *cli_args(tiny_llama_dir, corpus, out, {**TINY, "checkpoint_every": 2})],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "checkpoint-4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "checkpoint-4").is_dir() and not (out / "final").exists(), proc.stderr.read().decode()[-2000:]
    train(tiny_llama_dir, corpus, out, resume=True, checkpoint_every=2)
    assert_same_weights(out / "final", reference / "final", atol=0)
    assert len(list(out.glob("checkpoint-*"))) == 2  # keep_checkpoints


def test_two_processes_match_one(reference, tmp_path, tiny_llama_dir, corpus):
    """2 gloo processes x micro-batch 1 == 1 process x micro-batch 2 (the reference)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "harness.train", *cli_args(tiny_llama_dir, corpus, out, {**TINY, "batch_size": 1})]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    spec = json.loads((out / "final" / "diffusion_config.json").read_text())
    assert spec["recipe"]["world_size"] == 2
    for mine, theirs in zip(log(out), log(reference), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert_same_weights(out / "final", reference / "final", atol=1e-4)


# ----------------------------------------------------------------------------- bad input -> exit 2

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path_factory.mktemp("bert")
    BertForMaskedLM(BertConfig(vocab_size=len(tiny_tokenizer), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=32)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_bad_inputs_exit_2(cli, tmp_path, tiny_llama_dir, corpus, reference, bert_dir):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(tiny_llama_dir).max_position_embeddings
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    cases = {
        "does not exist": ["--data", tmp_path / "missing.txt"],
        "is empty": ["--data", tmp_path / "empty.txt"],
        "holds no text": ["--data", tmp_path / "blank.txt"],
        f"exceeds the context of .* \\({context} tokens\\)": ["--data", corpus, "--seq-len", context + 1],
        "is not a causal LM": ["--data", corpus, "--base", bert_dir],
        "unknown base model 'smolm2-135m'; did you mean smollm2-135m": ["--data", corpus, "--base", "smolm2-135m"],
    }
    for message, args in cases.items():
        base = [] if "--base" in args else ["--base", tiny_llama_dir]
        result = cli(*base, "--output", tmp_path / "out", "--steps", 1, *args)
        assert result.exit_code == 2, (message, result.output)
        assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
        assert re.search(message, result.output), result.output
    busy = cli("--base", tiny_llama_dir, "--data", corpus, "--output", reference)
    assert busy.exit_code == 2 and "holds another run" in busy.output
    assert not (tmp_path / "out").exists()
