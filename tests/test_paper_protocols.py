"""The authors' protocols, pinned with numbers worked out by hand or by brute force over all masks.

* ``paper_grid``: DiffuGPT/DiffuLLaMA ``eval_forward`` (``LLaMA-Factory/src/llamafactory/train/ddm/trainer.py``).
* ``diffugpt`` sampler: their ``generate_samples`` (same file).
* ``greedy=sequential``: SMDM ``evaluate_diff.py`` and LLaDA ``evaluation/eval_llada.py``
  (``suffix_greedy_prediction``).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from harness.models.diffusion.estimators import LikelihoodRequest, estimate, sequential_greedy
from harness.models.diffusion.samplers import FillRequest, diffugpt_sample

from conftest import TINY_MASK as MASK, TINY_VOCAB as VOCAB
from test_diffusion_estimators import CONTEXT, token_logprobs


@pytest.fixture(scope="module")
def model(tiny_denoiser_model):
    return tiny_denoiser_model


def grid_expectation(model, context, continuation, steps):
    """E[paper_grid] = (1/T) sum_t sum_{S nonempty} t^|S| (1-t)^(L-|S|) mean_{i in S} log p_i(S)."""
    length, total = len(continuation), 0.0
    means = {}
    for k in range(1, length + 1):
        for subset in itertools.combinations(range(length), k):
            means[subset] = token_logprobs(model, context, continuation, set(subset))[list(subset)].mean().item()
    for step in range(steps, 0, -1):
        t = step / steps
        total += sum(t ** len(s) * (1 - t) ** (length - len(s)) * m for s, m in means.items())
    return total / steps


def test_paper_grid_one_token_is_a_multiple_of_its_logprob_with_the_exact_mean(model):
    steps, keys = 8, 400
    logp = token_logprobs(model, CONTEXT, [7], {0}).item()
    requests = [LikelihoodRequest(CONTEXT, [7], f"q{i}") for i in range(keys)]
    values = [e.logprob for e in estimate(model, requests, mask_id=MASK, method="paper_grid", samples=steps,
                                          batch_size=256)]
    for value in values:  # each step contributes log p or 0 (nothing masked), and all T count
        masked_steps = value / logp * steps
        assert masked_steps == pytest.approx(round(masked_steps), abs=1e-4) and 0 <= round(masked_steps) <= steps
    mean, stderr = sum(values) / keys, torch.tensor(values).std().item() / math.sqrt(keys)
    assert grid_expectation(model, CONTEXT, [7], steps) == pytest.approx(logp * (steps + 1) / (2 * steps), abs=1e-9)
    assert abs(mean - logp * (steps + 1) / (2 * steps)) < 4 * stderr
    [forced] = estimate(model, requests[:1], mask_id=MASK, method="paper_grid_forced", samples=steps)
    assert forced.logprob == pytest.approx(logp, abs=1e-5)  # the earlier reading: about twice as low


def test_paper_grid_five_tokens_matches_brute_force_expectation(model):
    steps, keys, continuation = 4, 300, [9, 2, 6, 5, 11]
    exact = grid_expectation(model, CONTEXT, continuation, steps)
    requests = [LikelihoodRequest(CONTEXT, continuation, f"k{i}") for i in range(keys)]
    values = torch.tensor([e.logprob for e in estimate(model, requests, mask_id=MASK, method="paper_grid",
                                                       samples=steps, batch_size=256)])
    assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(keys), exact
    # the forced variant has a different expectation: it never lets a step contribute 0
    forced = torch.tensor([e.logprob for e in estimate(model, requests, mask_id=MASK, method="paper_grid_forced",
                                                       samples=steps, batch_size=256)])
    assert forced.mean().item() < values.mean().item()


def test_paper_grid_skips_the_model_on_steps_that_mask_nothing(model):
    steps = 8
    logp = token_logprobs(model, CONTEXT, [7], {0}).item()
    for est in estimate(model, [LikelihoodRequest(CONTEXT, [7], f"n{i}") for i in range(20)], mask_id=MASK,
                        method="paper_grid", samples=steps):
        masked_steps = round(est.logprob / logp * steps)
        assert est.nfe == masked_steps  # t = 1 always masks the token, so that row is the greedy row


# ---- the diffugpt sampler: which positions each of the T calls sees masked -----------------------
class Scripted:
    """Position i proposes token 1 + i; its confidence (max log-prob) is -0.1 - 0.01 i while masked and
    ``revealed_logp`` once revealed. Records the masked count of each call's fill region."""

    def __init__(self, start: int, n: int, revealed_logp: float) -> None:
        self.start, self.n, self.revealed, self.counts = start, n, revealed_logp, []

    def __call__(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        region = ids[0, self.start:self.start + self.n]
        self.counts.append(int((region == MASK).sum()))
        logits = torch.full((1, ids.shape[1], VOCAB), 0.0)
        for i in range(self.n):
            top = -0.1 - 0.01 * i if region[i] == MASK else self.revealed
            p = math.exp(top)
            logits[0, self.start + i] = math.log((1 - p) / (VOCAB - 1))
            logits[0, self.start + i, 1 + i] = top
        return logits


@pytest.mark.parametrize("revealed_logp, counts", [
    (-2.0, [8, 7, 5, 2, 0, 0, 0, 0]),  # revealed positions rank lowest: later steps reveal more than n/T
    (-0.01, [8, 7, 6, 5, 4, 3, 2, 1]),  # revealed positions rank highest: one token a step
])
def test_diffugpt_sampler_masked_counts_per_call(revealed_logp, counts):
    prefix = [3, 1, 4]
    spy = Scripted(len(prefix), 8, revealed_logp)
    out = diffugpt_sample(spy, [FillRequest(prefix, 8)], mask_id=MASK, steps=8)
    assert spy.counts == counts and out.steps == 8  # T calls even once nothing is masked
    assert out.tokens == [[1 + i for i in range(8)]]


def test_diffugpt_sampler_counts_by_hand():
    """By hand for n = 8, T = 8 with revealed positions ranked lowest (counts 8, 7, 5, 2, 0): step
    k keeps floor(8 (8 - k) / 8) = 8 - k lowest of all 8 positions, r of which are revealed."""
    masked, revealed = 8, 0
    expected = [masked]
    for k in range(1, 8):
        keep = max(0, min(masked, (8 - k) - revealed))
        revealed += masked - keep
        masked = keep
        expected.append(masked)
    assert expected == [8, 7, 5, 2, 0, 0, 0, 0]


# ---- the greedy check: one parallel pass vs one token at a time ---------------------------------
class Flip:
    """Continuation [4, 6]: with both masked, position 0 proposes 4 (p .6) and position 1 proposes 6
    (p .9); once position 1 holds 6, position 0 proposes 8 instead."""

    def __call__(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], VOCAB)
        for row in range(ids.shape[0]):
            second_known = ids[row, 3] == 6
            logits[row, 2, 8 if second_known else 4] = 5.0
            logits[row, 3, 6] = 8.0
        return logits


def test_sequential_and_parallel_greedy_checks_disagree():
    request = LikelihoodRequest([1, 2], [4, 6], "flip")
    [parallel] = estimate(Flip(), [request], mask_id=MASK, method="chain_rule", greedy="parallel")
    [sequential] = estimate(Flip(), [request], mask_id=MASK, method="chain_rule", greedy="sequential")
    assert parallel.is_greedy and not sequential.is_greedy
    assert (parallel.nfe, sequential.nfe) == (2, 4)  # chain rule: 2 rows; sequential adds 2 passes
    [other] = estimate(Flip(), [LikelihoodRequest([1, 2], [8, 6], "flip2")], mask_id=MASK, method="chain_rule",
                       greedy="sequential")
    assert other.is_greedy  # 6 first (most confident), then 8 given 6


def brute_sequential(model, context, continuation):
    state = list(context) + [MASK] * len(continuation)
    for _ in continuation:
        ids = torch.tensor([state])
        logp = model(ids, torch.ones_like(ids))[0, len(context):].float().log_softmax(-1)
        masked = [i for i in range(len(continuation)) if state[len(context) + i] == MASK]
        conf, tok = logp.max(-1)
        best = max(masked, key=lambda i: conf[i].item())
        state[len(context) + best] = int(tok[best])
    return state[len(context):] == list(continuation)


def test_sequential_greedy_matches_a_one_request_loop_at_any_batch_size(model):
    requests = [LikelihoodRequest(CONTEXT, cont, str(i)) for i, cont in enumerate([[7], [9, 2], [1, 1, 1], [4, 4]])]
    # make some continuations greedy by construction: decode them first
    decoded = []
    for r in requests:
        state = list(r.context_ids) + [MASK] * len(r.continuation_ids)
        for _ in r.continuation_ids:
            ids = torch.tensor([state])
            logp = model(ids, torch.ones_like(ids))[0, len(r.context_ids):].float().log_softmax(-1)
            masked = [i for i in range(len(r.continuation_ids)) if state[len(r.context_ids) + i] == MASK]
            conf, tok = logp.max(-1)
            best = max(masked, key=lambda i: conf[i].item())
            state[len(r.context_ids) + best] = int(tok[best])
        decoded.append(LikelihoodRequest(r.context_ids, state[len(r.context_ids):], r.key + "d"))
    everything = requests + decoded
    expected = [brute_sequential(model, r.context_ids, r.continuation_ids) for r in everything]
    assert any(expected) and not all(expected)
    for batch_size in (1, 3, 64):
        assert sequential_greedy(model, everything, mask_id=MASK, batch_size=batch_size) == expected


# ---- the backend: start token, segments, per-request sampler settings ---------------------------
def test_start_token_none_prepends_nothing_except_before_an_empty_context(tiny_dlm_dir):
    from harness.models.base import LoglikelihoodRequest as Request
    from harness.models.factory import build_model

    bos = build_model(str(tiny_dlm_dir))
    none = build_model(str(tiny_dlm_dir), model_args={"start_token": "none"})
    request = Request("The quick", " brown fox", segments=(" brown", " fox"))
    context, continuation = none.encode_pair(request)
    assert context == none.encode("The quick") and continuation == none.encode(" brown") + none.encode(" fox")
    assert bos.encode_pair(request)[0] == [bos.prefix_token] + context
    assert none.encode_pair(Request("", " fox"))[0] == [none.prefix_token]  # shifted: needs a first position
    assert none.fingerprint["start_token"] == "none" and bos.fingerprint["start_token"] == "bos"


def test_request_gen_kwargs_override_steps_skip_long_inputs_and_run_stages(tiny_dlm_dir):
    from harness.models.base import GenerateRequest, InfillRequest
    from harness.models.factory import build_model

    lm = build_model(str(tiny_dlm_dir), model_args={"sampler": "diffugpt"})
    default, stepped, skipped = lm.infill([
        InfillRequest("def add(a, b):", "\n", 4), InfillRequest("def add(a, b):", "\n", 4, gen_kwargs={"steps": 32}),
        InfillRequest("def add(a, b):", "\n", 4, gen_kwargs={"max_input_tokens": 3})])
    assert default.extra["steps"] == 4 and stepped.extra["steps"] == 32
    assert skipped.text == "" and "skipped" in skipped.extra
    one, two = lm.generate([GenerateRequest("The quick brown", 3), GenerateRequest("The quick brown", 3,
                                                                                    gen_kwargs={"stages": 2})])
    assert one.extra["steps"] == 3 and two.extra["steps"] == 6 and two.text.startswith(one.text)


def test_reproduction_view_pools_runs_that_differ_only_in_seed():
    from harness.report.reference import Match, Reference, pool_over_seeds

    ref = Reference("DiffuGPT", "DiffuGPT-S", "diffugpt-s", "LAMBADA", 21.6, "21.6", "%")
    runs = [Match(ref, "diffugpt-s", "lambada_gen acc", f"r{seed}", value, 1.0, 100, [], seed, "g")
            for seed, value in ((1, 20.0), (2, 23.0), (3, 21.0))]
    other = Match(ref, "diffugpt-s", "lambada_gen acc", "x", 30.0, 2.0, 100, [], 1, "h")  # another setting
    pooled = pool_over_seeds(runs + [other])
    assert len(pooled) == 2
    seeds = next(m for m in pooled if m.group == "g")
    assert seeds.ours == pytest.approx(64 / 3) and seeds.stderr == 1.0 and seeds.spread == "3 seeds: 20.0–23.0"
    assert next(m for m in pooled if m.group == "h").spread == "–"


def test_canvas_length_fills_what_the_prompt_leaves_at_every_stage(tiny_dlm_dir):
    from harness.models.base import GenerateRequest
    from harness.models.factory import build_model

    lm = build_model(str(tiny_dlm_dir), model_args={"sampler": "llada"})
    prompt = "Question: The quick brown fox"
    canvas = len(lm.start(lm.encode(prompt))) + 5
    [one] = lm.generate([GenerateRequest(prompt, 99, gen_kwargs={"canvas_length": canvas})])
    assert one.extra["steps"] == 5  # one step per filled token by default: 5 = canvas - prompt


# ---- logits only where they are read -------------------------------------------------------------
def test_logits_at_positions_equal_the_full_logits(tiny_dlm_dir):
    from harness.models.factory import build_model

    lm = build_model(str(tiny_dlm_dir))
    ids = torch.tensor([[1, 5, 7, lm.denoiser.mask_id, 9, 4], [2, 6, lm.denoiser.mask_id, 3, 0, 0]])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    full = lm.denoise(ids, mask)
    positions = torch.tensor([[0, 3, 4], [2, 3, 3]])
    picked = lm.denoise(ids, mask, positions=positions)
    expected = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
    assert picked.shape == (2, 3, full.shape[-1]) and torch.allclose(picked, expected, atol=1e-5)


def test_estimates_and_samples_unchanged_by_reading_logits_only_where_needed(tiny_dlm_dir):
    """The backend's denoiser takes positions; wrapping it so that it does not (the whole sequence
    through the head, then gathered) must give the same numbers."""
    from harness.models.base import GenerateRequest, LoglikelihoodRequest as Request
    from harness.models.factory import build_model

    fast = build_model(str(tiny_dlm_dir), model_args={"samples": 6, "sampler": "llada", "steps": 4})
    slow = build_model(str(tiny_dlm_dir), model_args={"samples": 6, "sampler": "llada", "steps": 4})
    whole = slow.denoise
    slow.denoise = lambda ids, mask: whole(ids, mask)  # no positions: the full head, then gathered
    requests = [Request("The quick brown", " fox jumps"), Request("Answer:", " yes")]
    for a, b in zip(fast.loglikelihood(requests), slow.loglikelihood(requests)):
        assert abs(a.logprob - b.logprob) < 1e-4 and a.is_greedy == b.is_greedy
    prompt = [GenerateRequest("The quick brown", 6)]
    assert fast.generate(prompt)[0].text == slow.generate(prompt)[0].text


def test_bidirectional_module_reads_logits_at_positions_only():
    from harness.models.diffusion.bidirectional import BidirectionalConfig, BidirectionalLM

    torch.manual_seed(0)
    model = BidirectionalLM(BidirectionalConfig(vocab_size=40, hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                intermediate_size=64)).eval()
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    positions = torch.tensor([[6, 0, 3], [4, 4, 1]])
    with torch.no_grad():
        full, picked = model(ids, mask), model(ids, mask, positions=positions)
    assert torch.allclose(picked, full.gather(1, positions[..., None].expand(-1, -1, 40)), atol=1e-5)
