"""Released block-diffusion and Dream checkpoints (SDAR, Fast-dLLM v2, Dream, LLaDA 2.x), loaded
without their remote code: tiny checkpoints in each released layout (config.json field names,
model_type / architectures, safetensors weight names) are written here, loaded by path with no
format given, and checked against references computed from the same weights: transformers' own
Qwen3 / Qwen2 with a hand-built block-causal or full mask, and for LLaDA 2 a forward pass of its
modeling code's maths written out below."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from conftest import build_tokenizer
from harness.config import ModelCard
from harness.errors import HarnessError
from harness.models.base import GenerateRequest, LoglikelihoodRequest
from harness.models.diffusion.formats import detect_format, load_denoiser
from harness.models.factory import build_model

Reference = Callable[[torch.Tensor], torch.Tensor]
D, HEADS, KV_HEADS, FFN, MAX_POS = 32, 4, 2, 48, 64
# released mask strings: SDAR's is in its added_tokens.json; the others' strings were not checked
MASK_TOKENS = {"sdar": "<|MASK|>", "sdar-tied": "<|MASK|>", "fast_dllm_v2": "|<MASK>|", "dream": "<|mask|>",
               "llada2": "<|mask|>"}


def tokenizer_with_mask(token: str | None):
    tok = build_tokenizer()
    if token:
        tok.add_special_tokens({"mask_token": token})
    return tok


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():  # tied parameters are listed once and stay tied
            p.normal_(0, 0.3)
    return module.eval()


def hand_mask(n: int, block: int | None) -> torch.Tensor:
    """Additive [1, 1, n, n]: query i sees key j when j // block <= i // block (all keys: no block)."""
    index = torch.arange(n)
    allowed = torch.ones(n, n, dtype=torch.bool) if block is None else index[None] // block <= index[:, None] // block
    return torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def masked_reference(lm: torch.nn.Module, block: int | None) -> Reference:
    def forward(ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        return lm(input_ids=ids, attention_mask=hand_mask(n, block), position_ids=torch.arange(n)[None]).logits

    return forward


def write_dir(root: Path, config: dict, state: dict[str, torch.Tensor], mask_token: str | None,
              shards: int = 1) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in names}, root / "model.safetensors")
    else:  # the released multi-shard layout with its index
        files = {f"model-{i + 1:05d}-of-{shards:05d}.safetensors": names[i::shards] for i in range(shards)}
        for file, keys in files.items():
            save_file({k: state[k].contiguous() for k in keys}, root / file)
        index = {"metadata": {}, "weight_map": {k: file for file, keys in files.items() for k in keys}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    tokenizer_with_mask(mask_token).save_pretrained(root)


QWEN = dict(hidden_size=D, intermediate_size=FFN, num_hidden_layers=2, num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POS, rms_norm_eps=1e-6, hidden_act="silu",
            bos_token_id=0, eos_token_id=0)


def make_sdar(root: Path, tied: bool = False, **extra) -> Reference:
    """SDAR-4B-Chat's config.json keys (no block_size, no mask_token_id); Qwen3 weight names."""
    vocab = len(tokenizer_with_mask(MASK_TOKENS["sdar"]))
    lm = randomize(Qwen3ForCausalLM(Qwen3Config(**QWEN, vocab_size=vocab, head_dim=16, attention_bias=False,
                                                 tie_word_embeddings=tied,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})))
    config = {**QWEN, "architectures": ["SDARForCausalLM"], "model_type": "sdar", "vocab_size": vocab, "head_dim": 16,
              "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig",
                           "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
              "attention_bias": False, "attention_dropout": 0.0, "rope_theta": 1000000, "rope_scaling": None,
              "tie_word_embeddings": tied, "sliding_window": None, "use_sliding_window": False,
              "attn_implementation": "flex_attention", "fuse_cross_entropy": True, "torch_dtype": "bfloat16", **extra}
    state = {k: v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    write_dir(root, config, state, MASK_TOKENS["sdar"])
    return masked_reference(lm, extra.get("block_size", 4))


def make_fast_dllm_v2(root: Path) -> Reference:
    """The 7B config.json's keys, bd_size 4 (32 released) so that short inputs span blocks."""
    vocab = len(tokenizer_with_mask(MASK_TOKENS["fast_dllm_v2"]))
    lm = randomize(Qwen2ForCausalLM(Qwen2Config(**QWEN, vocab_size=vocab, tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})))
    config = {**QWEN, "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen",
              "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                           "AutoModel": "modeling.Fast_dLLM_QwenModel",
                           "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
              "bd_size": 4, "conplemenrary_mask": True, "vocab_size": vocab, "layer_types": ["full_attention"] * 2,
              "max_window_layers": 2, "use_sliding_window": False, "sliding_window": None, "rope_theta": 1000000.0,
              "rope_scaling": None, "tie_word_embeddings": False, "pad_token_id": 0, "torch_dtype": "bfloat16"}
    write_dir(root, config, lm.state_dict(), MASK_TOKENS["fast_dllm_v2"])
    return masked_reference(lm, 4)


def make_dream(root: Path) -> Reference:
    """DreamConfig's keys (mask_token_id included), two shards; the mask token is the config's."""
    vocab = len(tokenizer_with_mask(None)) + 2
    lm = randomize(Qwen2ForCausalLM(Qwen2Config(**QWEN, vocab_size=vocab, tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})))
    config = {**QWEN, "architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": vocab,
              "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
              "mask_token_id": vocab - 1, "pad_token_id": 0, "rope_theta": 1000000.0, "rope_scaling": None,
              "tie_word_embeddings": False, "use_cache": False, "use_sliding_window": False, "sliding_window": None,
              "max_window_layers": 2, "torch_dtype": "bfloat16"}
    write_dir(root, config, lm.state_dict(), None, shards=2)
    dream_tokenizer_files(root)
    return masked_reference(lm, None)


def dream_tokenizer_files(root: Path) -> None:
    """Dream's tokenizer_config.json names its remote ``DreamTokenizer`` (a copy of Qwen2's slow
    tokenizer, vocab.json + merges.txt); the loader reads those files with Qwen2Tokenizer instead."""
    tok = tokenizer_with_mask(None)
    tok._tokenizer.model.save(str(root))  # vocab.json, merges.txt
    (root / "tokenizer.json").unlink()
    config = json.loads((root / "tokenizer_config.json").read_text())
    config |= {"tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer",
                                                                                   None]}}
    (root / "tokenizer_config.json").write_text(json.dumps(config))


# ---- LLaDA 2: its config.json keys and weight names, and its forward written out -------------------
LLADA2 = dict(vocab_size=len(build_tokenizer()) + 1, hidden_size=D, intermediate_size=FFN, num_hidden_layers=3,
              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=16, moe_intermediate_size=16,
              num_experts=8, num_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
              routed_scaling_factor=2.5, score_function="sigmoid", moe_router_enable_expert_bias=True,
              norm_topk_prob=True, norm_softmax=False, router_dtype="fp32", first_k_dense_replace=1,
              partial_rotary_factor=0.5, rotary_dim=8, rope_theta=600000, rope_scaling=None, rms_norm_eps=1e-6,
              max_position_embeddings=MAX_POS, pad_token_id=0, tie_word_embeddings=False, norm_head=False,
              use_bias=False, use_qkv_bias=False, use_qk_norm=True, hidden_act="silu", sliding_window=4096,
              max_window_layers=28, model_type="llada2_moe", architectures=["LLaDA2MoeModelLM"],
              auto_map={"AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
                        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM"})


def llada2_state(c: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(11)
    h, dim, inner = c["hidden_size"], c["head_dim"], c["moe_intermediate_size"]

    def w(*shape):
        return 0.3 * torch.randn(*shape)

    def norm(n):
        return 1 + 0.1 * torch.randn(n)

    def mlp(prefix, width):
        return {prefix + "gate_proj.weight": w(width, h), prefix + "up_proj.weight": w(width, h),
                prefix + "down_proj.weight": w(h, width)}

    state = {"model.word_embeddings.weight": torch.randn(c["vocab_size"], h), "model.norm.weight": norm(h),
             "lm_head.weight": w(c["vocab_size"], h)}
    qkv_rows = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * dim
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state |= {p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                  p + "attention.query_key_value.weight": w(qkv_rows, h),
                  p + "attention.query_layernorm.weight": norm(dim), p + "attention.key_layernorm.weight": norm(dim),
                  p + "attention.dense.weight": w(h, c["num_attention_heads"] * dim)}
        if i < c["first_k_dense_replace"]:
            state |= mlp(p + "mlp.", c["intermediate_size"])
            continue
        state |= {p + "mlp.gate.weight": w(c["num_experts"], h), p + "mlp.gate.expert_bias": 0.2 * torch.randn(8)}
        state |= mlp(p + "mlp.shared_experts.", inner * c["num_shared_experts"])
        for e in range(c["num_experts"]):
            state |= mlp(f"{p}mlp.experts.{e}.", inner)
    return state


def llada2_reference(s: dict[str, torch.Tensor], c: dict, block: int) -> Reference:
    """modeling_llada2_moe.py's forward as maths: fused qkv, qk-norm, partial RoPE, sigmoid router."""
    heads, kv, dim, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    rot = int(dim * c["partial_rotary_factor"])

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def swiglu(x, p):
        return (F.silu(x @ s[p + "gate_proj.weight"].T) * (x @ s[p + "up_proj.weight"].T)) @ s[p + "down_proj.weight"].T

    def rope(x, n):  # [B, T, heads, dim]: the first rot dims rotated (half split), the rest kept
        angle = torch.outer(torch.arange(n).float(), 1.0 / c["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        turned = torch.cat([-x_rot[..., rot // 2:], x_rot[..., :rot // 2]], -1)
        return torch.cat([x_rot * cos + turned * sin, x_pass], -1)

    def moe(x, p):  # x [T, hidden]
        scores = torch.sigmoid(x @ s[p + "gate.weight"].T)
        biased = scores + s[p + "gate.expert_bias"]
        groups = biased.view(len(x), c["n_group"], -1)
        kept = groups.topk(2, -1).values.sum(-1).topk(c["topk_group"], -1).indices
        allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter(1, kept, True)
        chosen = biased.masked_fill(~allowed.repeat_interleave(groups.shape[-1], 1), -torch.inf).topk(
            c["num_experts_per_tok"], -1).indices
        weights = scores.gather(1, chosen)
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * c["routed_scaling_factor"]
        out = torch.stack([sum(weights[t, j] * swiglu(x[t], f"{p}experts.{int(chosen[t, j])}.")
                               for j in range(chosen.shape[1])) for t in range(len(x))])
        return out + swiglu(x, p + "shared_experts.")

    def forward(ids: torch.Tensor) -> torch.Tensor:
        b, n = ids.shape
        x = s["model.word_embeddings.weight"][ids]
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            qkv = (rms(x, s[p + "input_layernorm.weight"]) @ s[p + "attention.query_key_value.weight"].T)
            q, k, v = qkv.view(b, n, heads + 2 * kv, dim).split([heads, kv, kv], dim=2)
            q = rope(rms(q, s[p + "attention.query_layernorm.weight"]), n).transpose(1, 2)
            k = rope(rms(k, s[p + "attention.key_layernorm.weight"]), n).transpose(1, 2)
            k = k.repeat_interleave(heads // kv, 1)
            v = v.transpose(1, 2).repeat_interleave(heads // kv, 1)
            attention = torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5 + hand_mask(n, block), -1) @ v
            x = x + attention.transpose(1, 2).reshape(b, n, -1) @ s[p + "attention.dense.weight"].T
            h = rms(x, s[p + "post_attention_layernorm.weight"])
            dense = i < c["first_k_dense_replace"]
            x = x + (swiglu(h, p + "mlp.") if dense else moe(h.reshape(b * n, -1), p + "mlp.").view(b, n, -1))
        return rms(x, s["model.norm.weight"]) @ s["lm_head.weight"].T

    return forward


def make_llada2(root: Path) -> Reference:
    state = llada2_state(LLADA2)
    write_dir(root, LLADA2, state, MASK_TOKENS["llada2"], shards=2)
    return llada2_reference(state, LLADA2, 32)


MAKERS = {"sdar": make_sdar, "sdar-tied": lambda root: make_sdar(root, tied=True),
          "fast_dllm_v2": make_fast_dllm_v2, "dream": make_dream, "llada2": make_llada2}
V = len(build_tokenizer())  # 300: the tokenizer's own tokens; an added mask token is id 300
# variant -> (format, block size, shifted, mask id)
EXPECTED = {"sdar": ("sdar", 4, False, V), "sdar-tied": ("sdar", 4, False, V),
            "fast_dllm_v2": ("fast_dllm_v2", 4, True, V), "dream": ("dream", None, True, V + 1),
            "llada2": ("llada2", 32, False, V)}


def card(path: Path, **defaults) -> ModelCard:
    """What ``build_model(path)`` should make of a released directory: a diffusion card naming no format."""
    return ModelCard(name=path.name, backend="diffusion", weights={"path": str(path)}, defaults=defaults)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    out = {}
    for name, make in MAKERS.items():
        reference = make(root / name)
        out[name] = (root / name, reference, build_model(card(root / name)))
    return out


IDS = torch.tensor([[3, 17, 5, 40, 9, 22, 11, 30, 2, 8]])  # 10 tokens: blocks of 4 end inside it


@pytest.mark.parametrize("name", MAKERS)
def test_logits_equal_the_reference(built, name):
    path, reference, lm = built[name]
    with torch.no_grad():
        ours, ref = lm.denoiser.model(IDS, torch.ones_like(IDS)), reference(IDS)
    assert ours.shape == ref.shape == (1, IDS.shape[1], lm.denoiser.model.lm.config.vocab_size)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    print(f"{name}: max |ours - reference| = {(ours - ref).abs().max():.2e} (logit scale {ref.abs().max():.1f})")


@pytest.mark.parametrize("name", MAKERS)
def test_format_block_shift_and_mask(built, name):
    path, _, lm = built[name]
    fmt, block, shifted, mask = EXPECTED[name]
    d = lm.denoiser
    assert detect_format(path) == fmt and d.format == fmt
    assert (lm.block_size, d.block_size, d.shifted, d.mask_id, d.max_length) == (block, block, shifted, mask, MAX_POS)
    assert lm.fingerprint.get("block_size") == block
    assert lm.fingerprint["kind"] == ("shifted" if shifted else "unshifted")
    if name == "dream":  # tokenizer_config.json names the remote DreamTokenizer: read as Qwen2's instead
        assert type(d.tokenizer).__name__ == "Qwen2Tokenizer"


@pytest.mark.parametrize("name", MAKERS)
def test_a_bare_released_directory_resolves_to_the_diffusion_backend(built, name):
    from harness.models.factory import resolve_card

    path, _, lm = built[name]
    assert resolve_card(str(path)) == card(path)
    by_path = build_model(str(path))
    ids = IDS[:, :8]
    assert torch.equal(by_path.denoiser.model(ids, torch.ones_like(ids)), lm.denoiser.model(ids, torch.ones_like(ids)))


@pytest.mark.parametrize("name", ["sdar", "fast_dllm_v2", "llada2"])
def test_blocks_see_only_themselves_and_earlier_blocks(built, name):
    lm = built[name][2]
    block, ids = lm.block_size, torch.randint(0, V, (1, 40))
    later = ids.clone()
    later[0, block:] = (ids[0, block:] + 1) % V
    with torch.no_grad():
        base, changed = lm.denoiser.model(ids, torch.ones_like(ids)), lm.denoiser.model(later, torch.ones_like(ids))
    assert torch.equal(base[0, :block], changed[0, :block])
    assert not torch.allclose(base[0, block:], changed[0, block:])


def test_dream_attends_to_later_tokens(built):
    lm = built["dream"][2]
    later = IDS.clone()
    later[0, -1] = 33
    with torch.no_grad():
        a, b = lm.denoiser.model(IDS, None), lm.denoiser.model(later, None)
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


ARGS = {"sdar": {"sampler": "threshold", "threshold": 0.9, "temperature": 1.0},
        "sdar-tied": {"sampler": "threshold", "threshold": 0.9},
        "fast_dllm_v2": {"sampler": "threshold", "threshold": 0.9, "block_length": 2, "temperature": 1.0},
        "dream": {"sampler": "llada", "steps": 6, "temperature": 1.0},
        "llada2": {"sampler": "threshold", "threshold": 0.95, "temperature": 1.0}}


@pytest.mark.parametrize("name", MAKERS)
def test_generate_and_loglikelihood_are_deterministic(built, name):
    path = built[name][0]
    generate = [GenerateRequest("The quick brown", max_tokens=6), GenerateRequest("Answer:", max_tokens=6)]
    score = [LoglikelihoodRequest("The quick brown", " fox jumps over"), LoglikelihoodRequest("Answer:", " yes")]
    runs = []
    for _ in range(2):
        lm = build_model(card(path), model_args={**ARGS[name], "samples": 4})
        lm.seed = 5
        runs.append(([(g.text, g.n_tokens, g.nfe) for g in lm.generate(generate)],
                     [(r.logprob, r.stderr) for r in lm.loglikelihood(score)]))
    assert runs[0] == runs[1]
    texts, scores = runs[0]
    assert all(0 < n <= 6 and nfe >= 1 for _, n, nfe in texts)
    assert all(logprob < 0 for logprob, _ in scores)
    if lm.block_size:  # the exact cache of finished blocks gives the same tokens
        cached = build_model(card(path), model_args={**ARGS[name], "samples": 4, "cache": "prefix"})
        cached.seed = 5
        assert [(g.text, g.n_tokens) for g in cached.generate(generate)] == [(t, n) for t, n, _ in texts]


def test_bfloat16_keeps_the_llada2_router_in_float32(built):
    d = load_denoiser(str(built["llada2"][0]), dtype="bfloat16")
    layer = d.model.lm.model.layers[1].mlp
    assert d.model.lm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert layer.gate.weight.dtype == layer.gate.e_score_correction_bias.dtype == torch.float32
    with torch.no_grad():
        logits = d.model(IDS, torch.ones_like(IDS)).float()
    torch.testing.assert_close(logits, built["llada2"][1](IDS), rtol=0.1, atol=0.5)


def test_hub_ids_are_known_without_a_download():
    for hub, fmt in [("JetLM/SDAR-1.7B-Chat", "sdar"), ("JetLM/SDAR-8B-Chat", "sdar"),
                     ("Efficient-Large-Model/Fast_dLLM_v2_7B", "fast_dllm_v2"),
                     ("Dream-org/Dream-v0-Instruct-7B", "dream"), ("inclusionAI/LLaDA2.0-mini", "llada2"),
                     ("inclusionAI/LLaDA2.1-mini", "llada2"), ("inclusionAI/LLaDA2.0-flash", "llada2")]:
        assert detect_format(hub) == fmt


# ---- bad layouts: one line each ---------------------------------------------------------------------
def copy_of(source: Path, target: Path, config: dict | None = None, drop: str | None = None,
            add: dict[str, torch.Tensor] | None = None) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    if config is not None:
        raw = json.loads((source / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({k: v for k, v in {**raw, **config}.items() if v != "DROP"}))
    if drop or add:
        index = target / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
        file = target / (weight_map[drop] if weight_map and drop else sorted(target.glob("*.safetensors"))[0].name)
        tensors = load_file(file)
        tensors.pop(drop, None)
        tensors.update(add or {})
        save_file(tensors, file)
        if weight_map is not None:
            weight_map.pop(drop, None)
            weight_map.update(dict.fromkeys(add or {}, file.name))
            index.write_text(json.dumps({"weight_map": weight_map}))
    return target


BAD = [
    ("sdar", {"drop": "model.layers.1.self_attn.k_norm.weight"},
     r"sdar layout: missing model\.layers\.1\.self_attn\.k_norm"),
    ("sdar", {"add": {"model.layers.0.self_attn.rogue.weight": torch.zeros(2)}}, r"sdar layout: .*unexpected .*rogue"),
    ("sdar", {"config": {"num_experts": 128, "model_type": "sdar_moe"}}, "mixture-of-experts SDAR"),
    ("sdar", {"config": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}},
     "unsupported sdar config rope_scaling"),
    ("sdar", {"config": {"use_sliding_window": True}}, "use_sliding_window"),
    ("sdar", {"config": {"hidden_size": 48}}, "sdar weights in .* do not fit their config"),
    ("sdar", {"config": {"num_hidden_layers": "DROP"}}, "sdar config.json in .* lacks num_hidden_layers"),
    ("fast_dllm_v2", {"config": {"bd_size": 0}}, "bd_size=0; expected a positive integer"),
    ("fast_dllm_v2", {"drop": "model.layers.0.self_attn.q_proj.bias"}, r"fast_dllm_v2 layout: missing .*q_proj\.bias"),
    ("dream", {"drop": "lm_head.weight"}, r"dream layout: missing lm_head\.weight"),
    ("llada2", {"drop": "model.layers.2.mlp.experts.7.up_proj.weight"},
     r"llada2 layout: missing model\.layers\.2\.mlp\.experts\.7\.up_proj\.weight"),
    ("llada2", {"config": {"score_function": "softmax"}}, "unsupported llada2 config score_function='softmax'"),
    ("llada2", {"config": {"use_bias": "DROP"}}, "unsupported llada2 config use_bias=True"),
    ("llada2", {"config": {"norm_head": True}}, "norm_head"),
    ("llada2", {"config": {"n_group": 3}}, "unsupported llada2 config n_group=3"),
    ("llada2", {"config": {"topk_group": 5}}, "unsupported llada2 config topk_group=5"),
    ("llada2", {"config": {"rotary_dim": 16}}, "unsupported llada2 config rotary_dim=16"),
    ("llada2", {"config": {"num_shared_experts": 0}}, "num_shared_experts=0"),
    ("llada2", {"config": {"num_key_value_heads": 4}}, "query_key_value.weight has 128 rows, the config makes 192"),
    ("llada2", {"config": {"rope_scaling": {"type": "dynamic", "factor": 2.0}}}, "rope_scaling"),
]


@pytest.mark.parametrize("name, change, message", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_layout_fails_with_one_line(built, tmp_path, name, change, message):
    path = copy_of(built[name][0], tmp_path / name, **change)
    with pytest.raises(HarnessError, match=message) as caught:
        load_denoiser(str(path))
    assert "\n" not in str(caught.value)


def test_a_block_size_that_contradicts_the_checkpoint_is_refused(built):
    fast, sdar, llada2, dream = (built[n][0] for n in ("fast_dllm_v2", "sdar", "llada2", "dream"))
    with pytest.raises(HarnessError, match=r"block_size 8 contradicts the fast_dllm_v2 checkpoint .* bd_size=4"):
        build_model(card(fast, config={"block_size": 8}))
    assert load_denoiser(str(fast), config={"block_size": 4}).block_size == 4  # agreeing is fine
    # SDAR and LLaDA 2 configs state no block size: the option sets it
    assert load_denoiser(str(sdar), config={"block_size": 8}).block_size == 8
    assert build_model(card(llada2, config={"block_size": 16})).block_size == 16
    with pytest.raises(HarnessError, match="full attention"):
        load_denoiser(str(dream), config={"block_size": 4})
    with pytest.raises(HarnessError, match=r"takes config=\{'block_size': n\}"):
        load_denoiser(str(sdar), config={"bd_size": 4})
    with pytest.raises(HarnessError, match="does not divide the model's block size 4"):
        build_model(card(fast, block_length=8))


def test_the_released_mask_id_is_the_default(built, tmp_path):
    """Without a mask token in the tokenizer or config.json the released id applies, which a tiny
    vocabulary does not hold; a card's mask_id still wins."""
    for name, released in (("sdar", 151669), ("fast_dllm_v2", 151665), ("llada2", 156895)):
        path = copy_of(built[name][0], tmp_path / name)
        for file in [*path.glob("*token*.json"), *path.glob("vocab.json"), *path.glob("merges.txt")]:
            file.unlink()
        tokenizer_with_mask(None).save_pretrained(path)
        with pytest.raises(HarnessError, match=f"mask id {released} is outside the"):
            load_denoiser(str(path))
        assert load_denoiser(str(path), mask_id=V - 1).mask_id == V - 1


def test_a_wrong_format_is_named(built):
    with pytest.raises(HarnessError, match="is not a llada2 checkpoint: config.json has model_type 'sdar'"):
        load_denoiser(str(built["sdar"][0]), "llada2")
    with pytest.raises(HarnessError, match="is not a dream checkpoint"):
        load_denoiser(str(built["fast_dllm_v2"][0]), "dream")


@pytest.mark.parametrize("card_name, variant", [("sdar-1.7b-chat", "sdar"), ("dream-v0-instruct-7b", "dream"),
                                                ("llada2.0-mini", "llada2"), ("llada2.1-mini", "llada2")])
def test_the_cards_load_the_released_layout(built, card_name, variant):
    """A card with its weights pointed at the tiny checkpoint (the released mask id does not fit a
    tiny vocabulary, so it is overridden): format, kind and block size as the card states them."""
    from dataclasses import replace

    from harness.catalog import Catalog

    released = Catalog().models.get(card_name)
    lm = build_model(replace(released, weights={"path": str(built[variant][0])}), model_args={"mask_id": V - 1})
    spec = released.diffusion
    assert (lm.denoiser.format, lm.denoiser.shifted, lm.block_size) == (spec.format, spec.kind == "shifted",
                                                                         spec.block_size)
    assert lm.sampler.name == spec.sampler and lm.sampler.block_length == released.defaults.get("block_length",
                                                                                                lm.block_size)
    assert lm.generate([GenerateRequest("The quick brown", max_tokens=4)])[0].n_tokens > 0


def test_a_card_block_size_the_checkpoint_does_not_have_is_refused(built):
    """The Fast-dLLM v2 cards say block size 32 (the released bd_size); the tiny checkpoint has 4."""
    from dataclasses import replace

    from harness.catalog import Catalog

    released = Catalog().models.get("fast-dllm-v2-7b")
    with pytest.raises(HarnessError, match="says block size 32 but the fast_dllm_v2 checkpoint has block size 4"):
        build_model(replace(released, weights={"path": str(built["fast_dllm_v2"][0])}), model_args={"mask_id": V - 1})
