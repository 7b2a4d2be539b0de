"""BD3-LM (kuleshov-group/bd3lm-owt-block_size4, _size8, _size16): the released config.json and
model.safetensors (weights under ``backbone.``), loaded into the harness's own :class:`DiT` with
block-causal attention (no remote code runs); unshifted, mask id = the last embedding row (50257:
GPT-2's 50,257 tokens plus the mask), the GPT-2 tokenizer, context ``model_length``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.diffusion.dit import DiT, DiTConfig, inverse_frequencies
from harness.models.diffusion.formats.common import (FORMATS, TOKENIZER_FILES, check_keys, check_supported, directory,
                                                     load_tokenizer, read_json, read_weights, weight_files)

BD3LM_TOKENIZER = "gpt2"
# Config fields whose other values change the network or need what the harness cannot give it.
WANTED = {"cross_attn": (True,), "adaln": (True,), "causal": (False,)}
FIELDS = ("vocab_size", "hidden_dim", "n_blocks", "n_heads", "cond_dim", "block_size", "model_length")
TOP = {"backbone.vocab_embed.embedding": "embed.weight",
       "backbone.sigma_map.mlp.0.weight": "sigma_map.0.weight", "backbone.sigma_map.mlp.0.bias": "sigma_map.0.bias",
       "backbone.sigma_map.mlp.2.weight": "sigma_map.2.weight", "backbone.sigma_map.mlp.2.bias": "sigma_map.2.bias",
       "backbone.output_layer.norm_final.weight": "norm.weight",
       "backbone.output_layer.linear.weight": "head.weight", "backbone.output_layer.linear.bias": "head.bias",
       "backbone.output_layer.adaLN_modulation.weight": "final_modulation.weight",
       "backbone.output_layer.adaLN_modulation.bias": "final_modulation.bias"}
PER_BLOCK = {"norm1.weight": "norm1.weight", "attn_qkv.weight": "qkv.weight", "attn_out.weight": "out.weight",
             "norm2.weight": "norm2.weight", "mlp.0.weight": "mlp.0.weight", "mlp.0.bias": "mlp.0.bias",
             "mlp.2.weight": "mlp.2.weight", "mlp.2.bias": "mlp.2.bias",
             "adaLN_modulation.weight": "modulation.weight", "adaLN_modulation.bias": "modulation.bias"}
# Buffers the release may hold: the rotary frequencies (checked) and the training-time clipping range.
OPTIONAL = ("backbone.rotary_emb.inv_freq", "sampling_eps_min", "sampling_eps_max")


@FORMATS.register("bd3lm")
def load_bd3lm(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    cfg = bd3lm_config(path, config)
    src = dict(TOP)
    src.update({f"backbone.blocks.{i}.{a}": f"blocks.{i}.{b}"
                for i in range(cfg.n_layers) for a, b in PER_BLOCK.items()})
    state = read_weights(weight_files(path))
    check_keys("bd3lm", path, set(src), set(state) - set(OPTIONAL))
    with torch.device("meta"):  # no random init: the weights come next
        model = DiT(cfg)
    try:
        model.load_state_dict({dst: state[s].to(dtype) for s, dst in src.items()}, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).strip().splitlines()[:2])
        raise HarnessError(f"bd3lm weights in '{path}' do not fit their config: {detail}") from exc
    check_rotary(state.get(OPTIONAL[0]), cfg, path)
    return model, bd3lm_tokenizer(tokenizer, path), cfg.mask_id, False, cfg.max_length


def bd3lm_tokenizer(name: str | None, path: Path):
    """A tokenizer saved beside the weights, else ``name`` or GPT-2 (the release ships none). The local
    one is read without the release's config.json, whose auto_map names BD3-LM's own code."""
    folder = directory(path)
    if name is not None or not any((folder / f).exists() for f in TOKENIZER_FILES):
        return load_tokenizer(name, path, BD3LM_TOKENIZER)
    from transformers import AutoTokenizer, PretrainedConfig

    try:
        return AutoTokenizer.from_pretrained(str(folder), config=PretrainedConfig(), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HarnessError(f"cannot load the tokenizer in '{folder}': {detail}") from exc


def bd3lm_config(path: Path, config: Any) -> DiTConfig:
    """The architecture from config.json beside the weights (or ``config``: a dict or a json file)."""
    if isinstance(config, dict):
        c = dict(config)
    elif isinstance(config, str):
        if not Path(config).exists():
            raise HarnessError(f"bd3lm config '{config}' does not exist")
        c = read_json(Path(config))
    else:
        c = read_json(directory(path) / "config.json")
    if not c:
        raise HarnessError(f"bd3lm checkpoint '{path}' has no config.json beside its weights")
    if c.get("model_type", "bd3lm") != "bd3lm":
        raise HarnessError(f"'{path}' has model_type {c['model_type']!r}, not 'bd3lm'")
    if c.get("time_conditioning"):
        raise HarnessError("unsupported BD3-LM config time_conditioning=True: the harness's denoiser calls carry "
                           "no noise level (the released checkpoints have false: sigma is 0)")
    check_supported("BD3-LM", c, WANTED)
    missing = [name for name in FIELDS if name not in c]
    if missing:
        raise HarnessError(f"bd3lm config.json in '{path}' lacks {', '.join(missing)}")
    values = {name: c[name] for name in FIELDS}
    bad = [f"{k}={v!r}" for k, v in values.items() if type(v) is not int or v < 1]
    if bad or values["hidden_dim"] % values["n_heads"] or values["hidden_dim"] // values["n_heads"] % 2:
        problem = ", ".join(bad) or "hidden_dim / n_heads must be an even integer"
        raise HarnessError(f"unsupported bd3lm config in '{path}': {problem}")
    return DiTConfig(vocab_size=values["vocab_size"], hidden_size=values["hidden_dim"], n_layers=values["n_blocks"],
                     n_heads=values["n_heads"], cond_dim=values["cond_dim"], block_size=values["block_size"],
                     max_length=values["model_length"], mask_id=values["vocab_size"] - 1)


def check_rotary(inv_freq: torch.Tensor | None, cfg: DiTConfig, path: Path) -> None:
    """A stored rotary buffer must be the base-10,000 frequencies the module computes."""
    if inv_freq is None:
        return
    expected = inverse_frequencies(cfg.head_dim, cfg.rope_theta)
    if inv_freq.shape != expected.shape or not torch.allclose(inv_freq.float(), expected, rtol=1e-5):
        raise HarnessError(f"bd3lm checkpoint '{path}' has rotary frequencies other than base 10,000 "
                           f"for head size {cfg.head_dim}")
