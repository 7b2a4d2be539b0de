"""SMDM's own numerics and protocol: bfloat16 rotary tables (rope_cache_dtype) and two-stage GSM8K."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_formats import HEADS, KV_HEADS, V, make_llada, smdm_reference, smdm_state, write_tokenizer

from harness.catalog import catalog
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, GenerationResult
from harness.models.diffusion.bidirectional import BidirectionalConfig, rope_tables, rotate
from harness.models.diffusion.formats import load_denoiser
from harness.tasks.smdm_gsm8k import answers_match, normalize_final_answer, smdm_answer

BLOCK = 64  # block_size of the tiny checkpoint


def smdm_rope_cache(seq_len: int, n_elem: int, base: int = 10000) -> tuple[torch.Tensor, torch.Tensor]:
    """SMDM's build_rope_cache(dtype=torch.bfloat16) as TransEncoder calls it, read from lit_gpt/diffmodel.py."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2) / n_elem))
    idx_theta = torch.outer(torch.arange(seq_len) / 1, theta)  # condense_ratio 1
    return torch.cos(idx_theta).bfloat16(), torch.sin(idx_theta).bfloat16()


def smdm_bf16_reference(state):
    """The tiny TransEncoder with SMDM's table (built for the whole block, cut to T): float32
    rotation on the bfloat16 values, as its fused rotary kernel computes."""
    def tables(t: int, hs: int):
        cos, sin = smdm_rope_cache(BLOCK, hs)
        return cos[:t], sin[:t]
    return smdm_reference(state, rope_cache=tables)


@pytest.fixture(scope="module")
def smdm(tmp_path_factory):
    """A tiny SMDM checkpoint; qkv weights scaled down to keep attention as soft as a trained model's,
    which leaves float32 noise near 1e-6 in log-probs (sharp random attention amplifies it tenfold)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("smdm")
    state = {k: v * 0.3 if k.endswith("attn.attn.weight") else v for k, v in smdm_state().items()}
    save_file(state, root / "mdm-tiny-1e18.safetensors")
    (root / "config.json").write_text(json.dumps({"block_size": BLOCK, "n_head": HEADS, "n_query_groups": KV_HEADS}))
    write_tokenizer(root)
    off, on = load_denoiser(str(root)), load_denoiser(str(root), rope_cache_dtype="bfloat16")
    return root, state, off, on


IDS = torch.randint(0, V - 3, (2, 60), generator=torch.Generator().manual_seed(3))


def logprobs(model, ids=IDS):
    with torch.no_grad():
        return torch.log_softmax(model(ids, torch.ones_like(ids)).double(), dim=-1)


def test_tables_equal_smdm_cache_bitwise():
    """At a real size (head 64, block 2048) the tables are SMDM's bf16 values, bit for bit."""
    cfg = BidirectionalConfig(vocab_size=8, hidden_size=1024, n_layers=1, n_heads=16, n_kv_heads=16,
                              intermediate_size=8, rope_cache_dtype="bfloat16")
    positions = torch.arange(2048)[None]
    cos, sin = rope_tables(cfg, positions)
    ref_cos, ref_sin = smdm_rope_cache(2048, 64)
    assert cos.dtype == torch.float32 and cos.shape == (1, 1, 2048, 64)
    for ours, ref in ((cos, ref_cos), (sin, ref_sin)):
        assert torch.equal(ours[0, 0, :, :32], ref.float()) and torch.equal(ours[0, 0, :, 32:], ref.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_is_the_fused_kernels_arithmetic(dtype):
    """q rotated as Attention does equals flash-attn's rotary kernel: float32 x1*cos - x2*sin and
    x1*sin + x2*cos on the bf16 table values, cast to q's dtype; bit for bit."""
    cfg = BidirectionalConfig(vocab_size=8, hidden_size=256, n_layers=1, n_heads=4, n_kv_heads=4,
                              intermediate_size=8, rope_cache_dtype="bfloat16")
    q = torch.randn(2, 4, 50, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    cos, sin = rope_tables(cfg, torch.arange(50)[None])
    ours = rotate(q.float(), cos, sin).type_as(q)
    c, s = (table[:50].float() for table in smdm_rope_cache(2048, 64))
    x1, x2 = q[..., :32].float(), q[..., 32:].float()
    assert torch.equal(ours, torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(dtype))


def test_off_tables_are_todays_float32():
    """None keeps the float32 tables exactly as before the option existed."""
    cfg = BidirectionalConfig(vocab_size=8, hidden_size=1024, n_layers=1, n_heads=16, n_kv_heads=16,
                              intermediate_size=8)
    positions = torch.arange(2048)[None]
    inv_freq = cfg.rope_theta ** -(torch.arange(0, 64, 2, dtype=torch.float32) / 64)  # the previous inline code
    angles = positions[:, None, :, None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = rope_tables(cfg, positions)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    assert not torch.equal(cos, rope_tables(BidirectionalConfig(**{**cfg.__dict__, "rope_cache_dtype": "bfloat16"}),
                                            positions)[0])


def test_off_is_unchanged(smdm):
    _, state, off, _ = smdm
    assert off.settings == {} and off.model.config.rope_cache_dtype is None
    with torch.no_grad():
        torch.testing.assert_close(off.model(IDS), smdm_reference(state)(IDS), rtol=1e-4, atol=1e-4)


def test_on_matches_smdm_bf16_reference(smdm):
    _, state, _, on = smdm
    assert on.settings == {"rope_cache_dtype": "bfloat16"} and on.model.config.rope_cache_dtype == "bfloat16"
    with torch.no_grad():
        ref = torch.log_softmax(smdm_bf16_reference(state)(IDS).double(), dim=-1)
    assert (logprobs(on.model) - ref).abs().max().item() < 1e-5  # 3.5e-6 seen; off vs float32 reference: 3.2e-6


def test_on_and_off_differ_measurably(smdm, capsys):
    _, state, off, on = smdm
    delta = (logprobs(on.model) - logprobs(off.model)).abs().max().item()
    with torch.no_grad():  # and the reference sees the same gap between its two tables
        ref = (torch.log_softmax(smdm_bf16_reference(state)(IDS).double(), -1)
               - torch.log_softmax(smdm_reference(state)(IDS).double(), -1)).abs().max().item()
    with capsys.disabled():
        print(f"\nmax |delta log-prob| bf16 vs fp32 rotary tables: {delta:.3e} (reference {ref:.3e})")
    assert delta > 5e-4 and abs(delta - ref) < 1e-5  # 1.9e-3 seen


def test_option_is_validated(smdm, tmp_path):
    root = smdm[0]
    with pytest.raises(HarnessError, match="rope_cache_dtype must be one of bfloat16"):
        load_denoiser(str(root), rope_cache_dtype="float16")
    make_llada(tmp_path / "llada")
    with pytest.raises(HarnessError, match="smdm checkpoints only .*llada"):
        load_denoiser(str(tmp_path / "llada"), rope_cache_dtype="bfloat16")
    assert load_denoiser(str(tmp_path / "llada")).settings == {}


def test_bf16_weights_take_the_option(smdm):
    """bfloat16 weights: q and k are rotated in float32 and cast back, so the model still runs."""
    root = smdm[0]
    model = load_denoiser(str(root), dtype="bfloat16", rope_cache_dtype="bfloat16").model
    with torch.no_grad():
        out = model(IDS, torch.ones_like(IDS))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ---- GSM8K as SMDM scores it -----------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("So she has 18 eggs.\n#### 18", "18"),
    ("#### 7\nThen 5 more.", ""),  # "####" on a non-final line does not count
    ("#### 7\nstep\n#### 18", "18"),  # the one on the final line wins
    ("#### 18\n", "18"),  # "$" also matches before one final newline
    ("#### 18\n\n", ""),  # ... but not two
    ("first #### 5 #### 7", "5 #### 7"),  # the capture runs from the first "#### " of the final line
    ("####18", ""),
    ("no answer", ""),
])
def test_smdm_answer_regex(text, expected):
    assert smdm_answer(text) == expected


@pytest.mark.parametrize("prediction, gold, expected", [
    ("1,000", "1000", True), ("18.0", "18", True), ("18.00", "18", True), ("$18", "18", True),
    ("18 dollars", "18", True), ("x = 18", "18", True), ("\\boxed{18}", "18", True), ("50%", "50", True),
    ("2,125", "2,125", True), ("1,450,000", "1,450,000", True), ("3/4", "0.75", True), ("-3", "-3", True),
    ("17", "18", False), ("", "18", False), ("5 #### 7", "7", False), ("18.5", "18", False),
])
def test_numeric_comparison(prediction, gold, expected):
    assert answers_match(prediction, gold) is expected


def test_normalisation():
    assert normalize_final_answer("1,000") == "1000" and normalize_final_answer("\\frac{1}{2}") == "1/2"


def test_task_requests_and_scoring(data_dir):
    task = catalog().task("gsm8k_smdm", data_dir)
    docs = task.docs()
    assert len(docs) == 1319
    (request,) = task.requests(docs[0])
    assert request == GenerateRequest(
        "Question: Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
        "muffins for her friends every day with four. She sells the remainder at the farmers' market daily "
        "for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' market?",
        256, (), gen_kwargs={"stages": 2, "canvas_length": 256})
    assert task.higher_is_better == {"acc": True} and task.settings()["options"]["stages"] == 2
    right = GenerationResult(" She sells 9 eggs for $2 each.\n#### 18.0", 20, 1)
    assert task.process(docs[0], [right]) == ({"acc": 1.0}, {"prediction": "18.0", "target": "18"})
    wrong = GenerationResult(" #### 18\nShe makes money.", 20, 1)
    assert task.process(docs[0], [wrong])[0] == {"acc": 0.0}


def test_prompts_never_hold_an_answer_marker(data_dir):
    """Why scoring the generated text equals scoring the whole decoded sequence: no prompt has "####"
    or ends in "#", so no match starts in the prompt or straddles into the generated text."""
    task = catalog().task("gsm8k_smdm", data_dir)
    contexts = [task.requests(doc)[0].context for doc in task.docs()]
    assert not any("####" in c or c.endswith("#") for c in contexts)


def test_stages_option(data_dir):
    task = catalog().task("gsm8k_smdm", data_dir, {"stages": 1})
    assert task.requests(task.docs()[0])[0].gen_kwargs == {"stages": 1, "canvas_length": 256}
    with pytest.raises(HarnessError, match="stages must be a positive integer"):
        catalog().task("gsm8k_smdm", data_dir, {"stages": 0})
    with pytest.raises(HarnessError, match="unknown option"):
        catalog().task("gsm8k_smdm", data_dir, {"num_fewshot": 5})
    assert json.dumps(task.settings())  # recorded and hashable
