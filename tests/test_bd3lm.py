"""BD3-LM checkpoints (kuleshov-group/bd3lm-owt-block_size4/8/16) in the harness's own DiT: a tiny
checkpoint in the released layout (config.json field names, ``backbone.`` weight names) against a
loop-based reference forward, block causality, the block ELBO, sampling, the exact cache and bad layouts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.config import ModelCard
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest
from harness.models.diffusion.estimators import LikelihoodRequest
from harness.models.diffusion.estimators.blockwise import estimate_blockwise
from harness.models.diffusion.formats import detect_format, load_denoiser
from harness.models.diffusion.samplers import FillRequest
from harness.models.factory import build_model, resolve_card

from conftest import build_tokenizer

HIDDEN, LAYERS, HEADS, COND, BLOCK, LENGTH, FREQ = 32, 2, 2, 16, 4, 64, 256
TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER) + 1  # the tokenizer's tokens and the mask, last (as 50,257 + 1 in the release)
MASK = VOCAB - 1
RELEASED_CONFIG = {  # the released config.json's fields, tiny dimensions
    "_name_or_path": "kuleshov-group/bd3lm-owt-block_size4", "architectures": ["BD3LM"], "attn_backend": "sdpa",
    "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
    "block_size": BLOCK, "cond_dim": COND, "cross_attn": True, "dropout": 0.1, "hidden_dim": HIDDEN,
    "model_length": LENGTH, "model_type": "bd3lm", "n_blocks": LAYERS, "n_heads": HEADS, "return_dict": False,
    "sampling_eps_max": 0.999, "sampling_eps_min": 0.001, "time_conditioning": False, "torch_dtype": "float32",
    "transformers_version": "4.49.0", "var_min": True, "vocab_size": VOCAB,
}


def released_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the released names (the adaLN layers nonzero, unlike the release's init)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    head = HIDDEN // HEADS
    state = {"backbone.vocab_embed.embedding": r(VOCAB, HIDDEN, scale=1.0),
             "backbone.sigma_map.mlp.0.weight": r(COND, FREQ), "backbone.sigma_map.mlp.0.bias": r(COND),
             "backbone.sigma_map.mlp.2.weight": r(COND, COND), "backbone.sigma_map.mlp.2.bias": r(COND),
             "backbone.rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, head, 2).float() / head)),
             "backbone.output_layer.norm_final.weight": 1 + r(HIDDEN, scale=0.1),
             "backbone.output_layer.linear.weight": r(VOCAB, HIDDEN), "backbone.output_layer.linear.bias": r(VOCAB),
             "backbone.output_layer.adaLN_modulation.weight": r(2 * HIDDEN, COND),
             "backbone.output_layer.adaLN_modulation.bias": r(2 * HIDDEN),
             "sampling_eps_min": torch.tensor(0.001), "sampling_eps_max": torch.tensor(0.999)}
    for i in range(LAYERS):
        p = f"backbone.blocks.{i}."
        state.update({p + "norm1.weight": 1 + r(HIDDEN, scale=0.1), p + "attn_qkv.weight": r(3 * HIDDEN, HIDDEN),
                      p + "attn_out.weight": r(HIDDEN, HIDDEN), p + "norm2.weight": 1 + r(HIDDEN, scale=0.1),
                      p + "mlp.0.weight": r(4 * HIDDEN, HIDDEN), p + "mlp.0.bias": r(4 * HIDDEN),
                      p + "mlp.2.weight": r(HIDDEN, 4 * HIDDEN), p + "mlp.2.bias": r(HIDDEN),
                      p + "adaLN_modulation.weight": r(6 * HIDDEN, COND), p + "adaLN_modulation.bias": r(6 * HIDDEN)})
    return state


def write_checkpoint(root: Path, state: dict[str, torch.Tensor] | None = None, **config) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({**RELEASED_CONFIG, **config}))
    save_file(state if state is not None else released_state(), root / "model.safetensors", metadata={"format": "pt"})
    TOKENIZER.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("bd3lm") / "bd3lm-tiny")


def card(path: Path, **changes) -> ModelCard:
    """A diffusion card that names no format (detected) and no mask id (the checkpoint's)."""
    return ModelCard(name="bd3lm-tiny", backend="diffusion", weights={"path": str(path)}, **changes)


# ---- the reference: the released network written out position by position ---------------------------

def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def rope(x: torch.Tensor, position: int) -> torch.Tensor:
    """One head's vector at ``position``: dimension j pairs with j + D/2 at angle position * 10000^(-2j/D)."""
    half = x.shape[0] // 2
    out = x.clone()
    for j in range(half):
        angle = position * 10000 ** (-2 * j / x.shape[0])
        a, b = x[j], x[j + half]
        out[j], out[j + half] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, H, D] each; query i attends to key j iff j // BLOCK <= i // BLOCK, looped."""
    n, heads, dim = q.shape
    out = torch.zeros_like(q)
    for h in range(heads):
        for i in range(n):
            seen = [j for j in range(n) if j // BLOCK <= i // BLOCK]
            scores = torch.stack([rope(q[i, h], i) @ rope(k[j, h], j) / math.sqrt(dim) for j in seen])
            weights = scores.softmax(0)
            out[i, h] = sum(w * v[j, h] for w, j in zip(weights, seen))
    return out


def reference_logits(state: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """float64 logits [N, V] of one unpadded row, computed from the released weights directly."""
    w = {k: v.double() for k, v in state.items()}
    sigma0 = torch.cat([torch.ones(FREQ // 2), torch.zeros(FREQ // 2)]).double()  # [cos(0), sin(0)]
    hidden = torch.nn.functional.silu(w["backbone.sigma_map.mlp.0.weight"] @ sigma0 + w["backbone.sigma_map.mlp.0.bias"])
    c = torch.nn.functional.silu(w["backbone.sigma_map.mlp.2.weight"] @ hidden + w["backbone.sigma_map.mlp.2.bias"])
    x = torch.stack([w["backbone.vocab_embed.embedding"][t] for t in ids])
    n, dim = len(ids), HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"backbone.blocks.{i}."
        shift1, scale1, gate1, shift2, scale2, gate2 = (w[p + "adaLN_modulation.weight"] @ c
                                                        + w[p + "adaLN_modulation.bias"]).chunk(6)
        qkv = (layer_norm(x, w[p + "norm1.weight"]) * (1 + scale1) + shift1) @ w[p + "attn_qkv.weight"].T
        q, k, v = (qkv[:, s * HIDDEN:(s + 1) * HIDDEN].reshape(n, HEADS, dim) for s in range(3))
        x = x + gate1 * (attention(q, k, v).reshape(n, HIDDEN) @ w[p + "attn_out.weight"].T)
        h = layer_norm(x, w[p + "norm2.weight"]) * (1 + scale2) + shift2
        h = gelu_tanh(h @ w[p + "mlp.0.weight"].T + w[p + "mlp.0.bias"]) @ w[p + "mlp.2.weight"].T + w[p + "mlp.2.bias"]
        x = x + gate2 * h
    shift, scale = (w["backbone.output_layer.adaLN_modulation.weight"] @ c
                    + w["backbone.output_layer.adaLN_modulation.bias"]).chunk(2)
    x = layer_norm(x, w["backbone.output_layer.norm_final.weight"]) * (1 + scale) + shift
    return x @ w["backbone.output_layer.linear.weight"].T + w["backbone.output_layer.linear.bias"]


# ---- tests ---------------------------------------------------------------------------------------------

def test_logits_equal_the_loop_reference(checkpoint):
    lm = build_model(card(checkpoint))
    ids = [5, 17, MASK, 33, 40, MASK, MASK, 41, 7, MASK, 2, 9]  # three blocks, some positions masked
    logits = lm.denoiser.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    expected = reference_logits(released_state(), ids)
    assert torch.allclose(logits[:, :MASK].double(), expected[:, :MASK], atol=1e-4, rtol=1e-4)
    assert bool((logits[:, MASK] == torch.finfo(logits.dtype).min).all())  # SUBS: the mask is never predicted
    padded = torch.tensor([ids, ids[:7] + [MASK] * 5])
    keep = torch.tensor([[1] * 12, [1] * 7 + [0] * 5])
    both = lm.denoiser.model(padded, keep)
    alone = lm.denoiser.model(torch.tensor([ids[:7]]), torch.ones(1, 7, dtype=torch.long))[0]
    assert torch.allclose(both[1, :7], alone, atol=1e-5)  # right padding changes nothing real
    picked = lm.denoiser.model(padded, keep, positions=torch.tensor([[0, 11], [3, 6]]))
    assert torch.allclose(picked, torch.stack([both[0, [0, 11]], both[1, [3, 6]]]), atol=1e-6)


def test_a_later_block_never_changes_an_earlier_one(checkpoint):
    model = load_denoiser(str(checkpoint)).model
    ids = torch.randint(0, VOCAB - 1, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    base = model(ids, mask)
    later = ids.clone()
    later[:, 8:] = MASK
    assert torch.equal(model(later, mask)[:, :8], base[:, :8])  # blocks 0 and 1, bit for bit
    inside = ids.clone()
    inside[:, 7] = (ids[:, 7] + 1) % (VOCAB - 1)  # block 1's last token: block 1 sees it, block 0 does not
    seen = model(inside, mask)
    assert torch.equal(seen[:, :4], base[:, :4]) and not torch.allclose(seen[:, 4], base[:, 4])


def test_block_size_mask_id_and_detection(checkpoint, tmp_path):
    denoiser = load_denoiser(str(checkpoint))
    assert (denoiser.format, denoiser.block_size, denoiser.shifted, denoiser.mask_id) == ("bd3lm", BLOCK, False, MASK)
    assert denoiser.max_length == LENGTH and detect_format(checkpoint) == "bd3lm"
    lm = build_model(card(checkpoint))
    assert lm.block_size == BLOCK and lm.fingerprint["block_size"] == BLOCK and lm.sampler.block_length == BLOCK
    for repo in ("kuleshov-group/bd3lm-owt-block_size4", "kuleshov-group/bd3lm-owt-block_size8",
                 "kuleshov-group/bd3lm-owt-block_size16"):
        assert detect_format(repo) == "bd3lm"
    bare = {k: v for k, v in RELEASED_CONFIG.items() if k not in ("model_type", "architectures", "auto_map")}
    root = write_checkpoint(tmp_path / "bare")
    (root / "config.json").write_text(json.dumps(bare))
    assert detect_format(root) == "bd3lm"  # by the weight names


@pytest.mark.parametrize("args", [{"estimator": "chain_rule"}, {"estimator": "mc_count", "samples": 6}])
def test_loglikelihood_is_the_block_elbo_and_deterministic(checkpoint, args):
    requests = [LoglikelihoodRequest("The quick brown", " fox jumps over"), LoglikelihoodRequest("def", " add(a")]
    first, second = build_model(card(checkpoint), model_args=args), build_model(card(checkpoint), model_args=args)
    a, b = first.loglikelihood(requests), second.loglikelihood(requests)
    assert [r.logprob for r in a] == [r.logprob for r in b]
    assert all(math.isfinite(r.logprob) and r.logprob < 0 for r in a)
    if args["estimator"] == "chain_rule":  # exact: the backend's value is the block ELBO's chain rule
        context, continuation = first.encode_pair(requests[0])
        [direct] = estimate_blockwise(first.denoise, [LikelihoodRequest(context, continuation, "k")],
                                      block_size=BLOCK, mask_id=MASK, method="chain_rule")
        assert math.isclose(a[0].logprob, direct.logprob, rel_tol=1e-6)
    else:  # Monte Carlo: another seed draws other masks
        second.seed = first.seed + 1
        assert [r.logprob for r in second.loglikelihood(requests)] != [r.logprob for r in a]


def test_generation_is_deterministic_and_the_cache_is_exact(checkpoint, monkeypatch):
    args = {"sampler": "llada", "steps": 8}
    requests = [GenerateRequest("The quick brown fox", 8), GenerateRequest("Answer:", 8)]  # padded rows
    plain = build_model(card(checkpoint), model_args=args, batch_size=4)
    again = build_model(card(checkpoint), model_args=args, batch_size=4)
    cached = build_model(card(checkpoint), model_args={**args, "cache": "prefix"}, batch_size=4)
    made, original = [], cached.block_cache
    monkeypatch.setattr(cached, "block_cache", lambda fills, s: made.append(original(fills, s)) or made[-1])
    expected = plain.generate(requests)
    assert [r.text for r in again.generate(requests)] == [r.text for r in expected]
    assert any(r.n_tokens for r in expected)
    assert [r.text for r in cached.generate(requests)] == [r.text for r in expected]
    assert made[0].cached_passes > 0  # the DiT's cached forward ran
    infill = [InfillRequest("def add(a, b):", "\n", 5)]
    assert [r.text for r in cached.infill(infill)] == [r.text for r in plain.infill(infill)]


def test_cached_logits_equal_recomputed_logits(checkpoint):
    lm = build_model(card(checkpoint), model_args={"sampler": "llada", "cache": "prefix"})
    prompt = [3, 9, 27, 81, 5, 6]  # the fill starts inside block 1
    cache = lm.block_cache([FillRequest(prompt, 6, (), "a")], lm.sampler)
    ids = torch.tensor([prompt + [MASK] * 6])
    mask, positions = torch.ones_like(ids), torch.tensor([[6, 7]])
    first = cache(ids, mask, positions)
    ids[0, 6] = 11  # the same block: a cached pass
    second = cache(ids, mask, positions)
    assert (cache.full_passes, cache.cached_passes) == (1, 1)
    assert torch.allclose(second, lm.denoise(ids, mask, positions), atol=1e-5) and not torch.allclose(first, second)


def one_line(call, match: str) -> None:
    with pytest.raises(HarnessError, match=match) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_bad_layouts_fail_in_one_line(tmp_path):
    state = released_state()
    missing = {k: v for k, v in state.items() if k != "backbone.blocks.1.attn_out.weight"}
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "a", missing))),
             r"bd3lm layout: missing backbone\.blocks\.1\.attn_out\.weight; unexpected none")
    extra = {**state, "backbone.blocks.2.attn_qkv.weight": torch.zeros(3 * HIDDEN, HIDDEN)}
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "b", extra))),
             r"missing none; unexpected backbone\.blocks\.2\.attn_qkv\.weight")
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "c", hidden_dim=64))), "do not fit their config")
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "d", time_conditioning=True))),
             "time_conditioning=True: the harness's denoiser calls carry no noise level")
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "e", cross_attn=False))),
             "unsupported BD3-LM config cross_attn=False")
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "f", block_size=0))), "block_size=0")
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "g", model_type="mdlm")), "bd3lm"),
             "model_type 'mdlm', not 'bd3lm'")
    rotary = {**state, "backbone.rotary_emb.inv_freq": state["backbone.rotary_emb.inv_freq"] * 2}
    one_line(lambda: load_denoiser(str(write_checkpoint(tmp_path / "h", rotary))), "rotary frequencies")
    root = write_checkpoint(tmp_path / "i")
    (root / "config.json").write_text(json.dumps({k: v for k, v in RELEASED_CONFIG.items() if k != "cond_dim"}))
    one_line(lambda: load_denoiser(str(root)), "lacks cond_dim")
    (root / "config.json").unlink()
    one_line(lambda: load_denoiser(str(root), "bd3lm"), "has no config.json")


def test_dual_cache_and_full_canvas_sampler_are_refused(checkpoint):
    lm = build_model(card(checkpoint), model_args={"cache": "dual"})
    one_line(lambda: lm.generate([GenerateRequest("Hi", 4)]), "exact cache is cache=prefix")
    one_line(lambda: build_model(card(checkpoint), model_args={"sampler": "diffugpt"}), "decodes block by block")


@pytest.mark.parametrize("size", [4, 8, 16])
def test_the_cards(size):
    c = resolve_card(f"bd3lm-owt-block-size{size}")
    assert c.backend == "diffusion" and c.weights == {"hub": f"kuleshov-group/bd3lm-owt-block_size{size}"}
    spec = c.diffusion
    assert (spec.format, spec.kind, spec.mask_id, spec.block_size) == ("bd3lm", "unshifted", 50257, size)
    assert c.defaults["block_length"] == size and c.dtype == "float32"


def test_a_bare_bd3lm_directory_resolves_to_the_diffusion_backend(checkpoint):
    from harness.models.factory import resolve_card

    assert resolve_card(str(checkpoint)).backend == "diffusion"
    lm = build_model(str(checkpoint))
    assert lm.denoiser.format == "bd3lm" and lm.block_size == lm.denoiser.model.block_size
