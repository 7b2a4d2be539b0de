"""Fast decoding: the EB-sampler, Fast-dLLM's factor rule, EOS-aware block samplers, tokens per forward.

The rules are checked on scripted denoisers whose per-position distributions are chosen by hand
(uniform over k tokens: entropy ln k; two tokens: confidence c), the unchanged defaults against
outputs recorded from the samplers before these options existed.
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from harness.errors import HarnessError
from harness.models.base import GenerationResult
from harness.models.diffusion.samplers import (SAMPLERS, FillRequest, entropy_bounded_sample, llada_sample,
                                               threshold_sample)
from harness.models.diffusion.samplers.entropy_bounded import entropy_bounded_count, token_entropy
from harness.models.diffusion.samplers.threshold import factor_count
from harness.models.settings import SamplerSettings, diffusion_settings
from harness.perf.throughput import Setting, Variant, fill_counted, measure
from harness.report.hardware import measurement_tables, tokens_per_forward

from conftest import TINY_MASK, Spy

OFF = -1e4  # a logit whose probability underflows to exactly 0


def positional(table: torch.Tensor, start: int):
    """A denoiser whose fill position i (canvas position start + i) always has logits ``table[i]``."""
    def denoise(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*input_ids.shape, table.shape[1]), OFF)
        width = min(table.shape[0], input_ids.shape[1] - start)
        logits[:, start:start + width] = table[:width]
        return logits
    return denoise


def uniform_over(ks: list[int], vocab: int) -> torch.Tensor:
    """Position i uniform over its first k_i tokens: entropy ln k_i."""
    table = torch.full((len(ks), vocab), OFF)
    for i, k in enumerate(ks):
        table[i, :k] = 0.0
    return table


def two_token(confidences: list[float], vocab: int) -> torch.Tensor:
    """Position i proposes token 0 with probability c_i (token 1 has the rest)."""
    table = torch.full((len(confidences), vocab), OFF)
    for i, c in enumerate(confidences):
        table[i, 0], table[i, 1] = math.log(c), math.log(1 - c)
    return table


def reveals(spy: Spy, mask_id: int, start: int, n: int, row: int = 0) -> list[set[int]]:
    """The fill positions of ``row`` revealed at each denoiser call."""
    masked = [ids[row, start:start + n] == mask_id for ids, _ in spy.batches] + [torch.zeros(n, dtype=torch.bool)]
    return [set((a & ~b).nonzero().squeeze(-1).tolist()) for a, b in zip(masked, masked[1:])]


# ---- the defaults reproduce the samplers as they were --------------------------------------------
REQUESTS = [FillRequest([1, 2, 3], 5, [4, 5], key="infill"), FillRequest([6], 3, key="generate"),
            FillRequest([7, 8, 9, 10], 8, [11], key="long")]
# recorded on tiny_denoiser_model (seed 3) before the EOS options, the factor rule and entropy_bounded
PINNED = [
    ("llada", {}, [[2, 4, 12, 2, 10], [12, 6, 2], [4, 12, 2, 4, 10, 2, 12, 7]], 8),
    ("llada", {"steps": 4, "block_length": 4}, [[2, 2, 12, 2, 10], [12, 6, 2], [4, 12, 12, 4, 10, 2, 12, 7]], 4),
    ("llada", {"steps": 6, "block_length": 3, "temperature": 1.0},
     [[2, 10, 12, 2, 13], [2, 11, 12], [13, 10, 10, 2, 2, 13, 12, 7]], 6),
    ("llada", {"temperature": 1.0, "remasking": "random", "cfg_scale": 1.5},
     [[2, 10, 14, 10, 2], [13, 12, 10], [7, 10, 2, 4, 12, 4, 3, 7]], 16),
    ("threshold", {}, [[2, 4, 12, 2, 10], [12, 6, 2], [4, 12, 2, 4, 10, 2, 12, 7]], 8),
    ("threshold", {"threshold": 0.5, "block_length": 3},
     [[2, 2, 12, 2, 10], [12, 6, 2], [4, 12, 12, 4, 10, 13, 12, 7]], 8),
    ("threshold", {"threshold": 0.3, "temperature": 1.0, "top_p": 0.8, "block_length": 4},
     [[2, 7, 12, 12, 9], [12, 13, 2], [2, 12, 12, 4, 10, 4, 12, 7]], 7),
    ("threshold", {"threshold": 0.2, "cfg_scale": 2.0},
     [[2, 13, 10, 10, 13], [12, 6, 2], [4, 12, 2, 4, 10, 2, 13, 7]], 4),
]


@pytest.mark.parametrize("ids", [{}, {"eos_id": 0, "eot_id": 1}])
@pytest.mark.parametrize("name,options,tokens,nfe", PINNED)
def test_defaults_reproduce_the_recorded_outputs(tiny_denoiser_model, name, options, tokens, nfe, ids):
    out = SAMPLERS[name](tiny_denoiser_model, REQUESTS, mask_id=TINY_MASK, seed=3, **options, **ids)
    assert out.tokens == tokens and out.nfe == nfe


def test_settings_defaults_and_validation():
    s = SamplerSettings()
    assert (s.gamma, s.factor) == (0.1, None)
    assert not (s.eos_stop or s.logits_eos_inf or s.confidence_eos_eot_inf)
    parsed = diffusion_settings({"sampler": "entropy_bounded", "gamma": 0, "factor": 2, "eos_stop": True}).sampler
    assert parsed.gamma == 0.0 and parsed.factor == 2.0 and parsed.eos_stop is True
    for bad in ({"gamma": -0.1}, {"factor": 0}, {"factor": -1.0}, {"eos_stop": "yes"}, {"logits_eos_inf": 1},
                {"confidence_eos_eot_inf": None}, {"name": "eb"}):
        with pytest.raises(HarnessError, match=next(iter(bad))):
            SamplerSettings(**bad)


def test_every_sampler_option_is_a_setting():
    """The backend passes a sampler the settings its signature names, the EOS/EOT ids and (from
    the model, not a setting) whether blocks align to the sequence start."""
    settings = {f.name for f in dataclasses.fields(SamplerSettings)}
    for name in SAMPLERS:
        given = {"denoise", "requests", "mask_id", "seed", "eos_id", "eot_id", "aligned_blocks"}
        options = set(inspect.signature(SAMPLERS[name]).parameters) - given
        assert options <= settings, (name, options - settings)


# ---- entropy_bounded ----------------------------------------------------------------------------
V8, MASK8 = 9, 8  # tokens 0..7, mask 8
KS = [4, 2, 8, 3, 2, 4]  # entropies ln 4, ln 2, ln 8, ln 3, ln 2, ln 4


def eb_run(ks, **options):
    spy = Spy(positional(uniform_over(ks, V8), 1))
    out = entropy_bounded_sample(spy, [FillRequest([0], len(ks))], mask_id=MASK8, **options)
    return out, reveals(spy, MASK8, 1, len(ks))


def test_entropy_bounded_reveals_by_hand_worked_entropies():
    # sorted: ln2 (1), ln2 (4), ln3 (3), ln4 (0), ln4 (5), ln8 (2); gamma 0: one a step, lowest first
    out, steps = eb_run(KS, gamma=0.0)
    assert steps == [{1}, {4}, {3}, {0}, {5}, {2}] and out.nfe == 6
    # gamma 1.5: the sums before each are 0, ln2 = .69, 2 ln2 = 1.39 (<= 1.5), 2 ln2 + ln3 = 2.49: three;
    # then ln4, ln4, ln8: 0, ln4 = 1.39, 2 ln4 = 2.77: two; then the last
    out, steps = eb_run(KS, gamma=1.5)
    assert steps == [{1, 4, 3}, {0, 5}, {2}] and out.nfe == out.steps == 3
    # blocks of 3: (ln4, ln2, ln8): 0, ln2, ln2 + ln4 = 2.08: {1, 0}, {2}; (ln3, ln2, ln4): 0, ln2, 1.79: {4, 3}, {5}
    out, steps = eb_run(KS, gamma=1.5, block_length=3)
    assert steps == [{1, 0}, {2}, {4, 3}, {5}]
    out, steps = eb_run(KS, gamma=1.5, cfg_scale=1.0)  # same distributions with guidance, two passes a call
    assert steps == [{1, 4, 3}, {0, 5}, {2}] and out.nfe == 6 and out.steps == 3
    out, steps = eb_run([1, 1, 2], gamma=0.0)  # zero entropies add nothing: all three at once
    assert steps == [{0, 1, 2}]


def test_entropy_bounded_count_and_tempered_entropy():
    ordered = torch.tensor([0.2, 0.3, 0.4, 0.5], dtype=torch.float64)  # sums before each: 0, .2, .5, .9
    assert [entropy_bounded_count(ordered, g) for g in (0.0, 0.2, 0.5, 0.95, 100.0)] == [1, 2, 3, 4, 4]
    demoted = torch.tensor([0.2, torch.inf, torch.inf], dtype=torch.float64)  # +inf: only ever first
    assert entropy_bounded_count(demoted, 100.0) == 1 and entropy_bounded_count(demoted[1:], 100.0) == 1
    logp = torch.tensor([[0.5, 0.25, 0.25]]).log()
    assert token_entropy(logp, 0.0).item() == pytest.approx(1.5 * math.log(2))
    assert token_entropy(logp, 1.0).item() == pytest.approx(1.5 * math.log(2))
    assert token_entropy(logp, 1e6).item() == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="gamma"):
        entropy_bounded_sample(positional(uniform_over([2], V8), 1), [FillRequest([0], 1)], mask_id=MASK8, gamma=-1)


# ---- the factor rule ----------------------------------------------------------------------------
V4, MASK4 = 5, 4
CONFIDENCES = [0.97, 0.6, 0.9, 0.8, 0.95, 0.7]


def threshold_run(confidences, **options):
    spy = Spy(positional(two_token(confidences, V4), 1))
    out = threshold_sample(spy, [FillRequest([2], len(confidences))], mask_id=MASK4, **options)
    return out, reveals(spy, MASK4, 1, len(confidences))


def test_factor_rule_by_hand_worked_confidences():
    # f = 0.8; sorted .97, .95, .9, .8, .7, .6: (k + 1)(1 - c_k) = -, .15, .4, 1.0 > .8: three;
    # then .8, .7, .6: 3 x .3 = .9 > .8: one; then .7, .6: 1.2 fails at the last: both (their loop)
    out, steps = threshold_run(CONFIDENCES, factor=0.8)
    assert steps == [{0, 4, 2}, {3}, {5, 1}] and out.nfe == 3
    out, steps = threshold_run(CONFIDENCES, threshold=0.85)  # the threshold rule: > .85, else the best one
    assert steps == [{0, 4, 2}, {3}, {5}, {1}]
    assert factor_count(torch.tensor([0.97, 0.95, 0.9, 0.8, 0.7, 0.6]), 0.8) == 3
    assert factor_count(torch.tensor([0.97, 0.95, 0.9, 0.8, 0.7, 0.6]), 1.1) == 4  # 5 x .2 = 1.0; 6 x .3 = 1.8 fails
    assert factor_count(torch.tensor([0.97, 0.95, 0.9, 0.8, 0.7, 0.6]), 2.0) == 6  # only the last fails (7 x .4)
    assert factor_count(torch.tensor([0.97, 0.95, 0.9, 0.8, 0.7, 0.6]), 2.9) == 6  # all pass
    assert factor_count(torch.tensor([0.8, 0.7, 0.6]), 0.8) == 1
    assert factor_count(torch.tensor([0.1]), 0.01) == 1
    with pytest.raises(ValueError, match="factor"):
        threshold_run([0.9], factor=0.0)


# ---- EOS options --------------------------------------------------------------------------------
EOT, EOS = 2, 3  # tokens 0, 1 ordinary; mask 4
ROW_A, ROW_B = 0, 1  # the prefix token says which script a row follows


def eos_script(n: int) -> dict[int, torch.Tensor]:
    """Row A: EOS at fill position 2 (p .956), EOT at 1 (p .880), elsewhere token i % 2 with falling
    confidence (position 0: .870, 3: .832, ...); row B: token i % 2 everywhere, never EOS."""
    a, b = torch.zeros(n, V4), torch.zeros(n, V4)
    for i in range(n):
        a[i, i % 2] = 3.0 - 0.1 * i
        b[i, i % 2] = 3.0
    a[2, EOS], a[1, EOT] = 6.0, 5.0
    a[:, MASK4] = b[:, MASK4] = OFF
    return {ROW_A: a, ROW_B: b}


def by_row(script: dict[int, torch.Tensor]):
    def denoise(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*input_ids.shape, V4), OFF)
        for row in range(len(input_ids)):  # an unconditional copy (prefix masked): uniform
            table = script.get(int(input_ids[row, 0]))
            if table is not None:
                logits[row, 1:1 + len(table)] = table
        return logits
    return denoise


def eos_run(sampler, rows, spy=False, **options):
    denoise = Spy(by_row(eos_script(12))) if spy else by_row(eos_script(12))
    out = sampler(denoise, [FillRequest([r], 12, (), str(r)) for r in rows], mask_id=MASK4, block_length=4,
                  eos_id=EOS, eot_id=EOT, **options)
    return (out, reveals(denoise, MASK4, 1, 12)) if spy else out


@pytest.mark.parametrize("sampler,options,nfe_alone,nfe_stopped", [
    (llada_sample, {}, 12, 4),  # one token a step: 4 steps a block
    (threshold_sample, {"threshold": 0.5}, 3, 1),  # every confidence > .5: one step a block
    (entropy_bounded_sample, {"gamma": 0.1}, 12, 4),  # entropies .2 and more (> gamma): one a step
])
def test_eos_in_the_first_block_stops_the_row(sampler, options, nfe_alone, nfe_stopped):
    plain = eos_run(sampler, [ROW_A], **options)
    stopped = eos_run(sampler, [ROW_A], eos_stop=True, **options)
    assert plain.nfe == nfe_alone and stopped.nfe == nfe_stopped
    assert stopped.tokens[0][:4] == plain.tokens[0][:4] and EOS in stopped.tokens[0][:4]
    assert stopped.tokens[0][4:] == [EOS] * 8 and plain.tokens[0][4:] != [EOS] * 8
    both = eos_run(sampler, [ROW_A, ROW_B], eos_stop=True, **options)  # B has no EOS: it runs to the end
    assert both.tokens == [stopped.tokens[0], eos_run(sampler, [ROW_B], **options).tokens[0]]
    assert both.nfe == nfe_alone
    guided = eos_run(sampler, [ROW_A], eos_stop=True, cfg_scale=1.0, **options)  # sharper, still stops
    assert guided.tokens[0][4:] == [EOS] * 8 and guided.nfe == 2 * guided.steps <= 2 * nfe_stopped


@pytest.mark.parametrize("sampler,options", [(llada_sample, {}), (threshold_sample, {"threshold": 0.99}),
                                             (entropy_bounded_sample, {"gamma": 0.0})])
def test_llada_instruct_options(sampler, options):
    banned = eos_run(sampler, [ROW_A], logits_eos_inf=True, eos_stop=True, **options)
    assert EOS not in banned.tokens[0] and banned.tokens[0][2] == 0  # the next best token of position 2
    assert banned.nfe == eos_run(sampler, [ROW_A], **options).nfe  # nothing to stop at
    _, first = eos_run(sampler, [ROW_A], spy=True, **options)
    _, last = eos_run(sampler, [ROW_A], spy=True, confidence_eos_eot_inf=True, **options)
    # by confidence (or entropy): EOS (2), EOT (1), then 0 and 3; demoted: 0, 3, then EOS before EOT
    assert first[:4] == [{2}, {1}, {0}, {3}] and last[:4] == [{0}, {3}, {2}, {1}]


def test_eos_options_need_the_ids():
    for options in ({"eos_stop": True}, {"logits_eos_inf": True}, {"confidence_eos_eot_inf": True}):
        for sampler in (llada_sample, threshold_sample, entropy_bounded_sample):
            with pytest.raises(ValueError, match="eos_id"):
                sampler(by_row(eos_script(4)), [FillRequest([ROW_A], 4)], mask_id=MASK4, **options)
    out = llada_sample(by_row(eos_script(4)), [FillRequest([ROW_A], 4)], mask_id=MASK4, eot_id=EOT,
                       confidence_eos_eot_inf=True)  # EOT alone is enough to demote
    assert len(out.tokens[0]) == 4


# ---- tokens per forward -------------------------------------------------------------------------
LIMITS = {"peak_flops": 1e12, "peak_bandwidth": 1e11}


def test_tpf_is_generated_tokens_per_row_forward():
    variant = Variant("toy", "diffusion", run=lambda prompts, s: 3 * len(prompts), first=lambda p, s: None, params=10,
                      weight_bytes=40, counts=lambda s: (2.0, 16.0))
    record = measure(variant, Setting(4, 4, batch_size=2), [[1] * 4] * 2, device="cpu", repeats=2, warmup=0,
                     limits=LIMITS)
    assert record["generated_tokens"] == 6 and record["nfe"] == 2 and record["tpf"] == 6 / (2 * 2)
    table = measurement_tables([{**record, "model": "toy", "dtype": "float32", "setting_label": "s", "quality": None,
                                 "hardware_id": "h", "hardware": {"cpu": "x"}, "run_id": "r"}])[0]
    header = table.header
    assert header[header.index("NFE") + 1] == "TPF" and table.rows[0][header.index("TPF")] == "1.50"
    old = {"generated_tokens": 256.0, "nfe": 64, "setting": {"batch_size": 2}}  # stored before ``tpf``
    assert tokens_per_forward(old) == 2.0 and tokens_per_forward({"nfe": 4}) is None


def test_dlm_rows_count_up_to_their_first_eos():
    class FakeDLM:
        tokenizer = type("Tokenizer", (), {"eos_token_id": 9})()

        def fill(self, fills):  # the fill regions as sampled, EOS padding included
            rows = [[4, 5, 6, 7, 4, 5, 6, 7], [4, 5, 6, 9, 9, 9, 9, 9], [9] * 8]
            return [GenerationResult(text="", n_tokens=8, nfe=1, extra={"tokens": t}) for t in rows]

    assert fill_counted(FakeDLM(), [FillRequest([1], 8)] * 3) == 8 + 4 + 1  # no EOS; EOS at 3 (counted); EOS first


def test_bench_records_tpf_for_ar_and_dlm(tiny_llama_dir, tiny_dlm_dir):
    from harness.models.factory import build_model
    from harness.perf.throughput import dlm_variants, hf_variants

    setting, prompts = Setting(gen_length=6, prompt_length=3, batch_size=2), [[5, 6, 7], [8, 9, 10]]
    ar = build_model(str(tiny_llama_dir))
    [kv] = hf_variants(ar, ["kv_cache"])
    record = measure(kv, setting, prompts, device="cpu", repeats=1, warmup=0, limits=LIMITS)
    assert record["tpf"] == 1.0  # one token a row a forward
    dlm = build_model(str(tiny_dlm_dir), batch_size=2)
    dlm.seed = 0
    for variant in dlm_variants(dlm, ["llada", "entropy_bounded"]):
        record = measure(variant, variant.adapt(setting), prompts, device="cpu", repeats=1, warmup=0, limits=LIMITS)
        assert record["tpf"] == record["generated_tokens"] / (record["nfe"] * 2) and record["generated_tokens"] <= 12
        assert record["fingerprint"]["sampler"]["name"] == variant.name
