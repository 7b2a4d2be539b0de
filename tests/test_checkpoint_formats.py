"""Loaders for released masked-diffusion checkpoint formats, on tiny checkpoints written here."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import save_file
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from harness.errors import HarnessError
from harness.models.diffusion.formats import Denoiser, detect_format, load_denoiser

V = 48  # tokenizer vocabulary; "[MASK]" is id 47
D, HEADS, KV_HEADS, LAYERS, FFN = 32, 4, 2, 2, 48
GPT2 = dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=64, vocab_size=V, bos_token_id=0, eos_token_id=0)
Reference = Callable[[torch.Tensor], torch.Tensor]


def write_tokenizer(directory: Path, mask: bool = True) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(V - 3)} | {"<pad>": V - 3, "<unk>": V - 2, "[MASK]": V - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"mask_token": "[MASK]"} if mask else {}
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                            **extra).save_pretrained(directory)


def randomize(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():  # tied parameters are listed once and stay tied
            p.normal_(0, 0.3)
    return module.eval()


def bidirectional(lm: nn.Module) -> Reference:
    """A transformers model made non-causal through its config, not through a 4-D mask."""
    lm.config.is_causal = False
    for module in lm.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return lambda ids: lm(ids).logits


class DiscreteDiffusionModel(nn.Module, PyTorchModelHubMixin):
    """The DiffuGPT wrapper's layout: GPT-2 body without wte, separate embed_tokens and lm_head."""

    def __init__(self, config: dict):
        super().__init__()
        lm = GPT2LMHeadModel(GPT2Config(**config))
        self.embed_tokens = lm.transformer.wte
        self.denoise_model = lm.transformer
        del self.denoise_model.wte
        self.lm_head = lm.lm_head


def gpt2_reference(wrapper: DiscreteDiffusionModel) -> Reference:
    lm = GPT2LMHeadModel(GPT2Config(**GPT2, tie_word_embeddings=False)).eval()
    state = {"transformer." + k: v for k, v in wrapper.denoise_model.state_dict().items()}
    lm.load_state_dict(state | {"transformer.wte.weight": wrapper.embed_tokens.weight,
                                "lm_head.weight": wrapper.lm_head.weight})
    return bidirectional(lm)


def make_diffugpt(root: Path) -> Reference:
    """The hub mixin's own save: tied head dropped, GPT-2 fields flat in config.json."""
    wrapper = randomize(DiscreteDiffusionModel(config=GPT2))
    wrapper.save_pretrained(root)
    write_tokenizer(root)
    return gpt2_reference(wrapper)


def make_diffugpt_nested(root: Path) -> Reference:
    """Untied head written out, GPT-2 config nested one level down in config.json."""
    wrapper = randomize(DiscreteDiffusionModel(config=GPT2))
    wrapper.lm_head.weight = nn.Parameter(torch.randn(V, D))
    root.mkdir()
    save_file({k: v.contiguous() for k, v in wrapper.state_dict().items()}, root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"config": GPT2 | {"model_type": "gpt2"}, "device": "cuda"}))
    write_tokenizer(root)
    return gpt2_reference(wrapper)


def make_diffullama(root: Path) -> Reference:
    config = LlamaConfig(hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=KV_HEADS, vocab_size=812, max_position_embeddings=64)
    lm = randomize(LlamaForCausalLM(config))
    lm.save_pretrained(root)
    write_tokenizer(root, mask=False)  # the default mask id 811 applies
    return bidirectional(lm)


def make_harness(root: Path) -> Reference:
    lm = randomize(GPT2LMHeadModel(GPT2Config(**GPT2)))
    lm.save_pretrained(root)
    write_tokenizer(root)
    spec = {"format": "dlm-harness", "version": 1, "kind": "unshifted", "mask_token_id": V - 1,
            "base_model": "tiny-gpt2", "steps": 100}
    (root / "diffusion_config.json").write_text(json.dumps(spec))
    return bidirectional(lm)


def smdm_state() -> dict[str, torch.Tensor]:
    qkv_rows = (HEADS + 2 * KV_HEADS) * (D // HEADS)
    state = {"transformer.wte.weight": torch.randn(V + 1, D), "lm_head.weight": torch.randn(V, D) * 0.3,
             "transformer.ln_f.weight": 1 + 0.1 * torch.randn(D)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        state |= {p + "norm_1.weight": 1 + 0.1 * torch.randn(D), p + "norm_2.weight": 1 + 0.1 * torch.randn(D),
                  p + "attn.attn.weight": 0.3 * torch.randn(qkv_rows, D),
                  p + "attn.proj.weight": 0.3 * torch.randn(D, D),
                  p + "mlp.swiglu.w1.weight": 0.3 * torch.randn(FFN, D),
                  p + "mlp.swiglu.w2.weight": 0.3 * torch.randn(FFN, D),
                  p + "mlp.swiglu.w3.weight": 0.3 * torch.randn(D, FFN)}
    return state


def smdm_reference(state: dict[str, torch.Tensor],
                   rope_cache: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> Reference:
    """SMDM's TransEncoder forward written out: lit-gpt fused qkv, flash-attn style rotary, no mask.
    ``rope_cache(T, hs)`` gives the cos/sin tables [T, hs/2] (default: float32); the rotation runs in
    float32 on them, as the fused kernel does."""
    hs, q_per_kv = D // HEADS, HEADS // KV_HEADS

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def forward(ids: torch.Tensor) -> torch.Tensor:
        b, t = ids.shape
        if rope_cache is None:
            angle = torch.outer(torch.arange(t).float(), 1.0 / 10000 ** (torch.arange(0, hs, 2).float() / hs))
            cos, sin = angle.cos(), angle.sin()
        else:
            cos, sin = (table.float() for table in rope_cache(t, hs))
        cos, sin = cos[:, None], sin[:, None]  # [T, 1, hs/2]

        def rope(x: torch.Tensor) -> torch.Tensor:  # [B, T, H, hs], non-interleaved halves
            x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)

        x = state["transformer.wte.weight"][ids]
        for i in range(LAYERS):
            p = f"transformer.h.{i}."
            qkv = (rms(x, state[p + "norm_1.weight"]) @ state[p + "attn.attn.weight"].T)
            q, k, v = qkv.view(b, t, KV_HEADS, q_per_kv + 2, hs).split((q_per_kv, 1, 1), dim=-2)
            q, k, v = rope(q.reshape(b, t, -1, hs)), rope(k.reshape(b, t, -1, hs)), v.reshape(b, t, -1, hs)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(q_per_kv, 1), \
                v.transpose(1, 2).repeat_interleave(q_per_kv, 1)
            y = torch.softmax(q @ k.transpose(-1, -2) / hs ** 0.5, dim=-1) @ v
            x = x + y.transpose(1, 2).reshape(b, t, D) @ state[p + "attn.proj.weight"].T
            h = rms(x, state[p + "norm_2.weight"])
            gate, up = h @ state[p + "mlp.swiglu.w1.weight"].T, h @ state[p + "mlp.swiglu.w2.weight"].T
            x = x + (F.silu(gate) * up) @ state[p + "mlp.swiglu.w3.weight"].T
        return rms(x, state["transformer.ln_f.weight"]) @ state["lm_head.weight"].T

    return forward


def make_smdm(root: Path) -> Reference:
    root.mkdir()
    state = smdm_state()
    save_file(state, root / "mdm-tiny-1e18.safetensors")
    lit_gpt = {"name": "Diff_LLaMA_tiny", "block_size": 64, "n_head": HEADS, "n_query_groups": KV_HEADS,
               "rotary_percentage": 1.0, "_norm_class": "FusedRMSNorm", "_mlp_class": "LLaMAMLP", "bias": False}
    (root / "config.json").write_text(json.dumps(lit_gpt))
    write_tokenizer(root)
    return smdm_reference(state)


LLADA_NAMES = {"attn_norm": "input_layernorm", "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
               "v_proj": "self_attn.v_proj", "attn_out": "self_attn.o_proj", "ff_norm": "post_attention_layernorm",
               "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "ff_out": "mlp.down_proj"}


def make_llada(root: Path) -> Reference:
    """LLaDA's names and config.json, in two shards; the reference is transformers' Llama, bidirectional."""
    lm = randomize(LlamaForCausalLM(LlamaConfig(
        hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=V, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)))
    hf = lm.state_dict()
    state = {"model.transformer.wte.weight": hf["model.embed_tokens.weight"],
             "model.transformer.ln_f.weight": hf["model.norm.weight"],
             "model.transformer.ff_out.weight": hf["lm_head.weight"]}
    for i in range(LAYERS):
        state |= {f"model.transformer.blocks.{i}.{a}.weight": hf[f"model.layers.{i}.{b}.weight"]
                  for a, b in LLADA_NAMES.items()}
    root.mkdir()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, root / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": D, "n_heads": HEADS,
              "n_kv_heads": KV_HEADS, "n_layers": LAYERS, "mlp_hidden_size": FFN, "mlp_ratio": 4,
              "vocab_size": V, "embedding_size": V, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "max_sequence_length": 64, "mask_token_id": V - 1, "weight_tying": False, "block_type": "llama",
              "activation_type": "silu", "layer_norm_type": "rms", "rope": True, "alibi": False,
              "include_bias": False, "include_qkv_bias": False, "input_emb_norm": False, "scale_logits": False,
              "block_group_size": 1, "attention_layer_norm": False}
    (root / "config.json").write_text(json.dumps(config))
    write_tokenizer(root)
    return bidirectional(lm)


MAKERS = {"diffugpt": make_diffugpt, "diffugpt-nested": make_diffugpt_nested, "diffullama": make_diffullama,
          "smdm": make_smdm, "llada": make_llada, "harness": make_harness}
# variant -> (format, mask id, shifted, max length)
EXPECTED = {"diffugpt": ("diffugpt", V - 1, True, 64), "diffugpt-nested": ("diffugpt", V - 1, True, 64),
            "diffullama": ("diffullama", 811, True, 64), "smdm": ("smdm", V, False, 64),
            "llada": ("llada", V - 1, False, 64), "harness": ("harness", V - 1, False, 64)}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Reference, Denoiser]]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name, make in MAKERS.items():
        path = root / ("diffullama-tiny" if name == "diffullama" else name)
        reference = make(path)
        out[name] = (path, reference, load_denoiser(str(path)))
    return out


IDS = torch.tensor([[3, 17, 5, 40, 9, 22, 11]])


@pytest.mark.parametrize("name", MAKERS)
def test_logits_match_reference(built, name):
    path, reference, denoiser = built[name]
    with torch.no_grad():
        ours, ref = denoiser.model(IDS, torch.ones_like(IDS)), reference(IDS)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MAKERS)
def test_detection_and_flags(built, name):
    path, _, denoiser = built[name]
    fmt, mask, shifted, max_length = EXPECTED[name]
    assert detect_format(path) == fmt
    flags = (denoiser.format, denoiser.mask_id, denoiser.shifted, denoiser.max_length)
    assert flags == (fmt, mask, shifted, max_length)
    assert denoiser.source == str(path) and denoiser.tokenizer("t1 t2").input_ids == [1, 2]


@pytest.mark.parametrize("name", MAKERS)
def test_full_attention(built, name):
    model = built[name][2].model
    changed = IDS.clone()
    changed[0, -1] = 30
    with torch.no_grad():
        a, b = model(IDS, torch.ones_like(IDS)), model(changed, torch.ones_like(IDS))
    assert (a[0, 0] - b[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", MAKERS)
def test_padding_invariance(built, name):
    model = built[name][2].model
    n, pad = IDS.shape[1], 2
    ids = torch.full((2, n + pad), V - 3)
    ids[0, :n], ids[1, pad:] = IDS[0], IDS[0]  # right- and left-padded copies
    mask = (ids != V - 3).long()
    with torch.no_grad():
        alone, padded = model(IDS, None), model(ids, mask)
    torch.testing.assert_close(padded[0, :n], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[1, pad:], alone[0], rtol=0, atol=1e-5)


def test_smdm_pth_and_size_by_name(tmp_path):
    """A Lightning-style .pth ({"model": state}) whose architecture comes from the SMDM size name."""
    torch.manual_seed(1)
    state = smdm_state()
    torch.save({"model": state, "iter_num": 7}, tmp_path / "mdm.pth")
    write_tokenizer(tmp_path)
    denoiser = load_denoiser(str(tmp_path / "mdm.pth"), config="Diff_LLaMA_6M")  # 4 heads in the release table
    torch.testing.assert_close(denoiser.model(IDS), smdm_reference(state)(IDS), rtol=1e-4, atol=1e-4)
    assert denoiser.format == "smdm" and denoiser.mask_id == V
    with pytest.raises(HarnessError, match="Diff_LLaMA_1028M"):
        load_denoiser(str(tmp_path / "mdm.pth"))


def test_explicit_mask_id_and_dtype(built):
    denoiser = load_denoiser(str(built["llada"][0]), "llada", mask_id=5, dtype="bfloat16")
    assert denoiser.mask_id == 5 and denoiser.model.head.weight.dtype == torch.bfloat16
    with pytest.raises(HarnessError, match="outside"):
        load_denoiser(str(built["llada"][0]), mask_id=V)


def test_unknown_format_suggests():
    with pytest.raises(HarnessError, match="did you mean diffugpt"):
        load_denoiser("anything", "difugpt")


def test_mismatched_keys_name_format_and_keys(tmp_path):
    state = smdm_state()
    state["transformer.h.1.attn.qkv.weight"] = state.pop("transformer.h.1.attn.attn.weight")
    save_file(state, tmp_path / "mdm.safetensors")
    with pytest.raises(HarnessError, match=r"smdm layout: missing transformer\.h\.1\.attn\.attn\.weight; "
                                           r"unexpected transformer\.h\.1\.attn\.qkv\.weight"):
        load_denoiser(str(tmp_path / "mdm.safetensors"), "smdm", config={"n_head": HEADS})


def test_llada_missing_key(built, tmp_path):
    source = built["llada"][0]
    for file in source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.transformer.blocks.1.up_proj.weight")
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / shard)
    del tensors["model.transformer.blocks.1.up_proj.weight"]
    save_file(tensors, tmp_path / shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HarnessError, match=r"llada layout: missing model\.transformer\.blocks\.1\.up_proj"):
        load_denoiser(str(tmp_path))


def test_hf_checkpoint_with_extra_tensor(tmp_path):
    root = tmp_path / "diffullama-extra"
    make_diffullama(root)
    from safetensors.torch import load_file

    tensors = load_file(root / "model.safetensors") | {"model.layers.0.self_attn.rogue.weight": torch.zeros(2)}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HarnessError, match="diffullama layout.*rogue"):
        load_denoiser(str(root))


def test_harness_without_mask_id(tmp_path):
    root = tmp_path / "ckpt"
    make_harness(root)
    spec = json.loads((root / "diffusion_config.json").read_text())
    del spec["mask_token_id"]
    (root / "diffusion_config.json").write_text(json.dumps(spec))
    with pytest.raises(HarnessError, match="mask_id"):
        load_denoiser(str(root))
    assert load_denoiser(str(root), mask_id=3).mask_id == 3


def test_paths_without_weights_or_format(tmp_path):
    with pytest.raises(HarnessError, match="holds no weights"):
        load_denoiser(str(tmp_path))
    with pytest.raises(HarnessError, match="holds no weights"):
        load_denoiser(str(tmp_path), "smdm")
    with pytest.raises(HarnessError, match="does not exist"):
        load_denoiser(str(tmp_path / "missing"))
    llama = tmp_path / "plain-llama"
    make_diffullama(llama)
    with pytest.raises(HarnessError, match="format='diffullama'"):
        detect_format(llama)
    assert load_denoiser(str(llama), "diffullama").shifted


def test_hub_ids_detect_without_download():
    assert detect_format("GSAI-ML/LLaDA-8B-Instruct") == "llada"
    assert detect_format("diffusionfamily/diffugpt-m") == "diffugpt"
    with pytest.raises(HarnessError, match="name one"):
        load_denoiser("nieshen/SMDM")
