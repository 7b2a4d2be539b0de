"""The block-diffusion recipe of the adaptation trainer (``harness adapt --block-size B``) on tiny models."""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_model
from training import assert_same_weights, cli_args, free_port, log, subprocess_env
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, LoglikelihoodRequest
from harness.models.diffusion.attention import BlockCausal, block_causal
from harness.train import data as train_data
from harness.train.blocks import (read_index, sample_block_noise, two_stream_allowed, two_stream_logits,
                                  two_stream_mask)
from harness.train.config import build_config
from harness.train.objective import NOISE, generator, mask_tokens, masked_losses, protected_positions, sample_noise
from harness.train.recipe import add_mask_token, run

BLOCK = 8
TINY = dict(steps=16, seq_len=32, batch_size=2, lr=3e-3, warmup_steps=2, checkpoint_every=8, keep_checkpoints=2,
            block_size=BLOCK)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train(model_dir: Path, corpus: Path, out: Path, **settings) -> dict:
    config = build_config(base=str(model_dir), data=str(corpus), output_dir=str(out), **{**TINY, **settings})
    return run(config, str(model_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llama_dir, corpus) -> Path:
    """An uninterrupted 16-step block run (blocks of 8 in sequences of 32), the yardstick below."""
    out = tmp_path_factory.mktemp("block-reference") / "run"
    train(tiny_llama_dir, corpus, out)
    return out


# ----------------------------------------------------------------------------- the 2L layout

@pytest.mark.parametrize("n, b", [(6, 2), (6, 3), (8, 4), (5, 1), (4, 4)])
def test_two_stream_mask_matches_a_brute_force_loop(n, b):
    allowed = two_stream_allowed(n, b)
    assert allowed.shape == (2 * n, 2 * n)
    for q, k in itertools.product(range(2 * n), range(2 * n)):
        q_clean, k_clean, qb, kb = q >= n, k >= n, (q % n) // b, (k % n) // b
        if not q_clean:  # noisy query: its own noisy block, and the clean blocks before it
            expected = kb < qb if k_clean else kb == qb
        else:  # clean query: block-causal over the clean stream, never a noisy key
            expected = k_clean and kb <= qb
        assert bool(allowed[q, k]) == expected, (q, k)
    assert torch.equal(allowed[n:, n:], block_causal(torch.ones(1, n, dtype=torch.bool), b)[0, 0])  # = inference
    additive = two_stream_mask(n, b, 3, torch.float32, "cpu")
    assert additive.shape == (3, 1, 2 * n, 2 * n)
    assert (additive[1, 0][allowed] == 0).all() and (additive[1, 0][~allowed] == torch.finfo(torch.float32).min).all()


def test_read_index_takes_a_blocks_first_token_from_the_clean_stream():
    assert read_index(6, 3, shift=True).tolist() == [0, 0, 1, 6 + 2, 3, 4]
    assert read_index(6, 3, shift=False).tolist() == [0, 1, 2, 3, 4, 5]
    assert read_index(4, 1, shift=True).tolist() == [0, 4, 5, 6]  # blocks of 1: every read is the clean stream


def test_block_noise_draws_one_rate_per_block():
    rates, u = sample_block_noise(generator(0, 0, NOISE), 3, 12, 4, 1e-3)
    assert rates.shape == u.shape == (3, 12)
    assert (rates.view(3, 3, 4) == rates.view(3, 3, 4)[..., :1]).all()  # constant inside a block
    assert rates[:, ::4].unique().numel() == 9  # and its own in every block
    t, plain_u = sample_noise(generator(0, 0, NOISE), 3, 12, 1e-3)  # blocks of N: the full recipe's draw
    whole, whole_u = sample_block_noise(generator(0, 0, NOISE), 3, 12, 12, 1e-3)
    assert torch.equal(whole, t[:, None].expand(3, 12)) and torch.equal(whole_u, plain_u)
    strata, _ = sample_block_noise(generator(0, 1, NOISE), 2, 16, 4, 1e-3, stratified=True)
    assert sorted(((strata[:, ::4] - 1e-3) / (1 - 1e-3) * 8).floor().long().flatten().tolist()) == list(range(8))
    rates, u = sample_block_noise(generator(0, 2, NOISE), 4, 8000, 1000, 1e-3)
    _, masked = mask_tokens(torch.zeros(4, 8000, dtype=torch.long), rates, u, torch.zeros(4, 8000, dtype=torch.bool), 7)
    torch.testing.assert_close(masked.view(4, 8, 1000).float().mean(-1), rates[:, ::1000], atol=0.05, rtol=0)


# ----------------------------------------------------------------------------- training == inference

@pytest.fixture(scope="module", params=["shifted", "unshifted"])
def block_dir(request, tiny_dlm_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp(f"block-{request.param}")
    shutil.copytree(tiny_dlm_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "diffusion_config.json").read_text())
    (path / "diffusion_config.json").write_text(json.dumps({**config, "kind": request.param, "block_size": 4}))
    return path


def test_training_logits_equal_the_inference_denoisers(block_dir):
    """Block b's training logits == the loaded checkpoint's denoiser over [clean blocks < b, noisy block b]."""
    from harness.models.factory import build_model

    lm = build_model(str(block_dir), dtype="float32")
    shifted, mask_id, n, b = lm.denoiser.shifted, lm.denoiser.mask_id, 12, 4
    torch.manual_seed(1)
    clean = torch.randint(0, 250, (2, n))
    noisy = clean.masked_fill(torch.rand(2, n) < 0.5, mask_id)
    noisy[:, 3] = mask_id  # the last token of block 0 is masked: the noisy and clean reads before block 1 differ
    hf = lm.denoiser.model.lm
    with torch.no_grad():
        trained = two_stream_logits(hf, noisy, clean, two_stream_mask(n, b, 2, torch.float32, "cpu"),
                                    read_index(n, b, shifted))
        gathered = two_stream_logits(hf, noisy, clean, two_stream_mask(n, b, 2, torch.float32, "cpu"),
                                     read_index(n, b, shifted), keep_logits=False)
        both = two_stream_logits(hf, noisy, clean, two_stream_mask(n, b, 2, torch.float32, "cpu"),
                                 torch.arange(2 * n))  # every output of the 2L pass, noisy then clean
    torch.testing.assert_close(trained, gathered, atol=1e-6, rtol=0)
    for block in range(n // b):
        ids = torch.cat([clean[:, : block * b], noisy[:, block * b: (block + 1) * b]], dim=1)
        inference = lm.denoise(ids, torch.ones_like(ids))  # aligned: row i predicts token i
        lo = max(block * b, 1 if shifted else 0)  # shifted: no logit predicts token 0
        torch.testing.assert_close(trained[:, lo: (block + 1) * b], inference[:, lo: (block + 1) * b],
                                   atol=1e-5, rtol=1e-5)
    if shifted:  # the first token of block 1 is read from the clean stream's position 3, not the noisy one's
        torch.testing.assert_close(trained[:, 4], both[:, n + 3], atol=1e-6, rtol=0)
        assert not torch.allclose(both[:, n + 3], both[:, 3], atol=1e-3)


def test_blocks_of_one_token_train_the_causal_lm():
    """Shifted with B = 1 every token is read from the clean stream at i - 1: plain AR next-token logits."""
    model = build_tiny_model("llama", 300)
    torch.manual_seed(2)
    ids = torch.randint(0, 299, (2, 10))
    noisy = ids.masked_fill(torch.rand(2, 10) < 0.5, 299)
    with torch.no_grad():
        trained = two_stream_logits(model, noisy, ids, two_stream_mask(10, 1, 2, torch.float32, "cpu"),
                                    read_index(10, 1, True))
        causal = model(input_ids=ids).logits
    torch.testing.assert_close(trained[:, 1:], causal[:, :-1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the loss by hand

def hand_case(shift: bool) -> tuple[torch.Tensor, ...]:
    """N = 4, B = 2, V = 3: the 2N outputs as log-probs, t = 0.5 in block 0 and 0.25 in block 1."""
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5], [0.8, 0.1, 0.1],  # noisy stream
                          [0.1, 0.8, 0.1], [0.25, 0.5, 0.25], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])  # clean stream
    targets = torch.tensor([[2, 0, 1, 0]])
    masked = torch.tensor([[False, True, True, True]]) if shift else torch.tensor([[True, False, True, True]])
    rates = torch.tensor([[0.5, 0.5, 0.25, 0.25]])
    outputs = probs.log()[None][:, read_index(4, 2, shift)]
    return outputs, targets, masked, rates


def test_the_block_loss_by_hand():
    ln2, ln125 = math.log(2), math.log(1.25)
    # shifted: token 1 <- noisy 0 (p .5), token 2 opens block 1 <- clean 1 (p .5), token 3 <- noisy 2 (p .25)
    weighted, plain = masked_losses(*hand_case(shift=True), shift=False)
    assert weighted.item() == pytest.approx(ln2 / 0.5 + ln2 / 0.25 + 2 * ln2 / 0.25, rel=1e-6)  # 14 ln 2
    assert plain.item() == pytest.approx(4 * ln2, rel=1e-6)
    # unshifted: token i <- noisy i: p .25, .25, .8
    weighted, plain = masked_losses(*hand_case(shift=False), shift=False)
    assert weighted.item() == pytest.approx(2 * ln2 / 0.5 + 2 * ln2 / 0.25 + ln125 / 0.25, rel=1e-6)
    assert plain.item() == pytest.approx(4 * ln2 + ln125, rel=1e-6)


def test_first_logged_loss_is_the_block_objective_through_inference(reference, tiny_llama_dir):
    """Step 0 by hand on the base model, each block scored as inference does: BlockCausal over
    [clean blocks < b, noisy block b], shifted reads at i - 1; sum of CE / t_b over masked tokens / count."""
    from harness.models.loading import load_causal_lm

    model, tok = load_causal_lm(str(tiny_llama_dir))
    torch.manual_seed(0)
    mask_id = add_mask_token(model, tok)
    cfg = build_config(base=str(tiny_llama_dir), data="x", **TINY)
    documents = train_data.read_source(json.loads((reference / "run.json").read_text())["data"], sft=False)
    blocks = train_data.tokenise(documents, tok, 32, sft=False)
    clean = blocks.input_ids[train_data.DataOrder(len(blocks), 0).indices(0, 2)]
    rates, u = sample_block_noise(generator(0, 0, NOISE), 2, 32, BLOCK, cfg.min_t)
    noisy, masked = mask_tokens(clean, rates, u, protected_positions(torch.zeros(2, dtype=torch.long), 32, True),
                                mask_id)
    denoiser, weighted, plain = BlockCausal(model, BLOCK), 0.0, 0.0
    for block in range(32 // BLOCK):
        lo, hi = block * BLOCK, (block + 1) * BLOCK
        ids = torch.cat([clean[:, :lo], noisy[:, lo:hi]], dim=1)
        with torch.no_grad():
            logp = denoiser(ids, torch.ones_like(ids)).float().log_softmax(-1)
        for row, i in itertools.product(range(2), range(max(lo, 1), hi)):
            if masked[row, i]:
                ce = -logp[row, i - 1, clean[row, i]].item()
                weighted, plain = weighted + ce / rates[row, i].item(), plain + ce
    first, count = log(reference)[0], masked.sum().item()
    assert first["loss"] == pytest.approx(weighted / count, rel=1e-4)
    assert first["unweighted_loss"] == pytest.approx(plain / count, rel=1e-4)


# ----------------------------------------------------------------------------- training runs

def test_block_training_reduces_the_loss_and_records_block_size(reference):
    records = log(reference)
    assert [r["step"] for r in records] == list(range(1, 17))
    first = sum(r["unweighted_loss"] for r in records[:3]) / 3
    last = sum(r["unweighted_loss"] for r in records[-3:]) / 3
    assert last < first - 0.25  # 5.74 -> 5.20 here
    assert records[-1]["tokens_seen"] == 16 * 2 * 32 and (reference / "loss.png").stat().st_size > 0
    run_json = json.loads((reference / "run.json").read_text())
    assert (run_json["block_size"], run_json["anneal"]) == (BLOCK, False)
    spec = json.loads((reference / "final" / "diffusion_config.json").read_text())
    assert (spec["block_size"], spec["kind"], spec["recipe"]["block_size"]) == (BLOCK, "shifted", BLOCK)


def test_the_checkpoint_loads_as_a_block_diffusion_model(reference):
    from harness.models.factory import build_model

    lm = build_model(str(reference / "final"))
    assert lm.block_size == BLOCK and lm.denoiser.shifted and lm.fingerprint["block_size"] == BLOCK
    [scored] = lm.loglikelihood([LoglikelihoodRequest("The quick brown", " fox jumps over")])
    assert math.isfinite(scored.logprob) and scored.logprob < 0 and scored.n_tokens > 0
    [made] = lm.generate([GenerateRequest("The quick brown", 10)])
    assert isinstance(made.text, str) and made.nfe > 0


def test_block_resume_matches_an_uninterrupted_run(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")  # as if stopped after checkpoint-8
    train(tiny_llama_dir, corpus, out, resume=True)
    assert [(r["step"], r["loss"], r["unweighted_loss"]) for r in log(out)] == \
        [(r["step"], r["loss"], r["unweighted_loss"]) for r in log(reference)]  # bit for bit
    assert_same_weights(out / "final", reference / "final", atol=0)
    with pytest.raises(HarnessError, match="block_size 8 -> 4"):
        train(tiny_llama_dir, corpus, reference, resume=True, block_size=4)


def test_block_grad_accumulation_matches_a_larger_micro_batch(reference, tmp_path, tiny_llama_dir, corpus):
    out = tmp_path / "accum"
    train(tiny_llama_dir, corpus, out, batch_size=1, grad_accum=2, checkpoint_every=0)
    assert_same_weights(out / "final", reference / "final", atol=1e-5)


def test_block_two_processes_match_one(reference, tmp_path, tiny_llama_dir, corpus):
    """2 gloo processes x micro-batch 1 == 1 process x micro-batch 2 (the reference)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "harness.train", *cli_args(tiny_llama_dir, corpus, out, {**TINY, "batch_size": 1})]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for mine, theirs in zip(log(out), log(reference), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    assert_same_weights(out / "final", reference / "final", atol=1e-4)


# ----------------------------------------------------------------------------- the CLI

def test_unshifted_block_run_through_the_cli(cli, tmp_path, tiny_llama_dir, corpus):
    from harness.models.factory import build_model

    out = tmp_path / "unshifted"
    result = cli("--base", tiny_llama_dir, "--data", corpus, "--out", out, "--steps", 3, "--seq-len", 16,
                 "--batch-size", 2, "--block-size", 4, "--no-shift", "--preset", "quick")  # the preset's anneal: off
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "final" / "diffusion_config.json").read_text())
    assert (spec["kind"], spec["block_size"], spec["recipe"]["anneal"]) == ("unshifted", 4, False)
    lm = build_model(str(out / "final"))
    assert lm.block_size == 4 and not lm.denoiser.shifted
    assert math.isfinite(lm.loglikelihood([LoglikelihoodRequest("The quick", " brown fox")])[0].logprob)


@pytest.mark.parametrize("args, message", [
    (["--block-size", 5], r"block-size 5 does not divide seq-len 32"),
    (["--block-size", 0], r"block-size must be at least 1, got 0"),
    (["--block-size", -4], r"block-size must be at least 1, got -4"),
    (["--block-size", 8, "--anneal"], r"--anneal does not apply with --block-size"),
])
def test_bad_block_sizes_exit_2(cli, tmp_path, tiny_llama_dir, corpus, args, message):
    result = cli("--base", tiny_llama_dir, "--data", corpus, "--out", tmp_path / "out", "--steps", 1,
                 "--seq-len", 32, *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error:") and result.output.count("\n") == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists()
