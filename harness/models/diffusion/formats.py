"""Load released masked-diffusion checkpoints as full-attention denoisers.

``load_denoiser(source)`` reads a local path or a hub id in one of these layouts:

* ``diffugpt`` (diffusionfamily/diffugpt-s, -m): a PyTorchModelHubMixin save of a wrapper with
  ``embed_tokens``, ``denoise_model`` (a GPT-2 body without wte) and ``lm_head``; shifted.
* ``diffullama`` (diffusionfamily/diffullama): a plain Llama-2 directory run bidirectionally; shifted.
* ``smdm`` (nieshen/SMDM): a lit-gpt ``TransEncoder`` state dict; unshifted.
* ``llada`` (GSAI-ML/LLaDA-8B-*): LLaDA's own safetensors and config.json; unshifted.
* ``harness``: a Hugging Face causal-LM directory plus ``diffusion_config.json``.

smdm and llada load into :class:`BidirectionalLM`, so no remote code runs.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harness.errors import HarnessError, unknown_name
from harness.models.diffusion.bidirectional import ROPE_CACHE_DTYPES, BidirectionalConfig, BidirectionalLM
from harness.models.loading import torch_dtype

HUB_FORMATS = {
    "diffusionfamily/diffugpt-s": "diffugpt", "diffusionfamily/diffugpt-m": "diffugpt",
    "diffusionfamily/diffullama": "diffullama", "nieshen/smdm": "smdm",
    "gsai-ml/llada-8b-base": "llada", "gsai-ml/llada-8b-instruct": "llada",
}
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
SMDM_TOKENIZER = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
# n_head of SMDM's Diff_LLaMA_<size>M configs (lit_gpt/config.py); every other size is in the weights.
SMDM_HEADS = {6: 4, 19: 6, 34: 8, 48: 9, 66: 10, 75: 8, 85: 10, 113: 12, 142: 12, 170: 12, 180: 14,
              206: 14, 231: 14, 268: 16, 302: 16, 336: 16, 472: 10, 551: 10, 571: 11, 629: 10,
              666: 11, 717: 12, 761: 11, 831: 12, 944: 12, 1028: 14, 1233: 14, 1476: 16,
              1678: 16, 2121: 17}
GPT2_FIELDS = ("n_head", "n_inner", "activation_function", "layer_norm_epsilon", "scale_attn_weights",
               "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "bos_token_id", "eos_token_id")


@dataclass
class Denoiser:
    model: nn.Module  # forward(input_ids [B,N], attention_mask [B,N]) -> logits [B,N,V], full attention
    tokenizer: Any
    mask_id: int
    shifted: bool  # True: logits at position i predict token i+1
    format: str
    source: str
    max_length: int
    settings: dict[str, Any] = field(default_factory=dict)  # load-time options that change the numbers


class FullAttention(nn.Module):
    """Run a transformers causal LM with full attention and return plain logits.

    A 4-D additive mask [B,1,N,N] (0 for real keys, the dtype's minimum for padding keys) replaces
    the causal mask; real tokens take positions 0, 1, ... whichever side the padding is on.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        dtype, n = self.lm.dtype, input_ids.shape[1]
        bias = torch.zeros(keep.shape, dtype=dtype, device=input_ids.device)
        bias = bias.masked_fill(~keep, torch.finfo(dtype).min)[:, None, None, :].expand(-1, 1, n, n)
        positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
        return self.lm(input_ids=input_ids, attention_mask=bias, position_ids=positions, use_cache=False).logits


def load_denoiser(source: str, format: str | None = None, *, dtype: str = "float32", device: str = "cpu",
                  mask_id: int | None = None, tokenizer: str | None = None,
                  config: str | dict | None = None, rope_cache_dtype: str | None = None) -> Denoiser:
    """Load ``source`` (path or hub id) as a :class:`Denoiser`; ``format`` None: :func:`detect_format`.

    ``config`` gives the architecture where the weights do not (smdm): a name such as
    ``Diff_LLaMA_1028M``, a dict of lit-gpt fields, or a json file; ``tokenizer`` overrides the
    checkpoint's tokenizer and ``mask_id`` its mask token. ``rope_cache_dtype="bfloat16"`` (smdm
    only) rounds the rotary tables to bfloat16 as SMDM's own code does.
    """
    if format is not None and format not in LOADERS:
        raise unknown_name("checkpoint format", format, LOADERS)
    fmt = format or (None if Path(source).expanduser().exists() else HUB_FORMATS.get(_repo_id(source)))
    path = _local(source)
    fmt = fmt or detect_format(path)
    settings = {"rope_cache_dtype": rope_cache_dtype} if rope_cache_dtype is not None else {}
    if settings and (fmt != "smdm" or rope_cache_dtype not in ROPE_CACHE_DTYPES):
        raise HarnessError(f"rope_cache_dtype must be one of {', '.join(ROPE_CACHE_DTYPES)} and applies to smdm "
                           f"checkpoints only (got {rope_cache_dtype!r} for a {fmt} checkpoint)")
    model, tok, default_mask, shifted, max_length = LOADERS[fmt](
        path, dtype=torch_dtype(dtype), tokenizer=tokenizer, config=config, **settings)
    mask = mask_id if mask_id is not None else default_mask
    if mask is None:
        raise HarnessError(f"{fmt} checkpoint '{source}' names no mask token; pass mask_id")
    rows = _embedding(model).num_embeddings
    if not 0 <= mask < rows:
        raise HarnessError(f"mask id {mask} is outside the {rows}-token embedding of '{source}'")
    model.to(device).eval()
    return Denoiser(model, tok, int(mask), shifted, fmt, source, int(max_length), settings)


def detect_format(path: str | Path) -> str:
    """The format of a local checkpoint from its files and weight names (or of a known hub id)."""
    path = Path(path).expanduser()
    if not path.exists():
        if _repo_id(str(path)) in HUB_FORMATS:
            return HUB_FORMATS[_repo_id(str(path))]
        raise HarnessError(f"checkpoint '{path}' does not exist")
    if path.is_dir() and (path / "diffusion_config.json").exists():
        return "harness"
    config = _read_json(path / "config.json") if path.is_dir() else {}
    if config.get("model_type") == "llada" or "LLaDAModelLM" in config.get("architectures", []):
        return "llada"
    if config.get("model_type") == "llama":
        if "diffullama" in str(path.resolve()).lower():
            return "diffullama"
        raise HarnessError(f"'{path}' is a plain Llama checkpoint: pass format='diffullama' if it is "
                           "DiffuLLaMA, or add diffusion_config.json for a harness checkpoint")
    keys = set(_read_weights(_weight_files(path), keys_only=True))
    if any(k.startswith("denoise_model.") for k in keys):
        return "diffugpt"
    if any(k.startswith("model.transformer.blocks.") for k in keys):
        return "llada"
    if any(re.fullmatch(r"transformer\.h\.\d+\.attn\.attn\.weight", k) for k in keys):
        return "smdm"
    raise HarnessError(f"cannot tell the checkpoint format of '{path}'; pass format= one of "
                       f"{', '.join(LOADERS)}")


# --- loaders: (path, dtype, tokenizer, config) -> (model, tokenizer, mask id, shifted, max length)

def _load_diffugpt(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel

    state = _read_weights(_weight_files(path))
    # Old transformers saved GPT-2's causal-mask buffers (h.N.attn.bias / masked_bias): not weights.
    state = {k: v for k, v in state.items() if not re.search(r"\.attn\.(masked_)?bias$", k)}
    _require(state, "diffugpt", path, ["embed_tokens.weight", "denoise_model.wpe.weight"])
    vocab, n_embd = state["embed_tokens.weight"].shape
    fields = _gpt2_fields(_read_json(_directory(path) / "config.json"))
    fields.update(vocab_size=vocab, n_embd=n_embd, n_positions=state["denoise_model.wpe.weight"].shape[0],
                  n_layer=_count_layers(state, r"denoise_model\.h\.(\d+)\."))
    fields.setdefault("n_head", n_embd // 64)  # every GPT-2 size has 64-dimensional heads
    tied = "lm_head.weight" not in state  # the mixin's safetensors save drops the tied copy
    lm = GPT2LMHeadModel(GPT2Config(**fields, tie_word_embeddings=tied))
    body = {"denoise_model." + k[len("transformer."):]: k for k in lm.state_dict()
            if k.startswith("transformer.") and not k.startswith("transformer.wte.")}
    expected = {"embed_tokens.weight", *body} | (set() if tied else {"lm_head.weight"})
    _check_keys("diffugpt", path, expected, set(state))
    mapped = {hf: state[src] for src, hf in body.items()}
    mapped["transformer.wte.weight"] = state["embed_tokens.weight"]
    mapped["lm_head.weight"] = state.get("lm_head.weight", state["embed_tokens.weight"])
    lm.load_state_dict(mapped)
    tok = _tokenizer(tokenizer, path, "gpt2")
    mask = tok.mask_token_id if tok.mask_token_id is not None else (50257 if vocab > 50257 else 10541)
    return FullAttention(lm.to(dtype)), tok, mask, True, fields["n_positions"]


def _load_diffullama(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    lm = _causal_lm(path, "diffullama", dtype, model_type="llama")
    tok = _tokenizer(tokenizer, path, None)
    mask = tok.mask_token_id if tok.mask_token_id is not None else 811
    return FullAttention(lm), tok, mask, True, _hf_max_length(lm.config)


def _load_harness(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    spec = _read_json(path / "diffusion_config.json")
    if spec.get("format") != "dlm-harness" or spec.get("version") != 1:
        raise HarnessError(f"'{path}/diffusion_config.json' is not a version-1 dlm-harness file "
                           f"(format={spec.get('format')!r}, version={spec.get('version')!r})")
    if spec.get("kind") not in ("shifted", "unshifted"):
        raise HarnessError(f"'{path}/diffusion_config.json' kind must be shifted or unshifted, "
                           f"not {spec.get('kind')!r}")
    lm = _causal_lm(path, "harness", dtype)
    tok = _tokenizer(tokenizer, path, spec.get("base_model"))
    return FullAttention(lm), tok, spec.get("mask_token_id"), spec["kind"] == "shifted", _hf_max_length(lm.config)


def _load_smdm(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any,
               rope_cache_dtype: str | None = None) -> tuple:
    files = _weight_files(path)
    state = _read_weights(files)
    fields = _smdm_fields(files[0], config)
    _require(state, "smdm", path, ["transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.attn.weight",
                                   "transformer.h.0.mlp.swiglu.w1.weight"])
    unsupported = {"_norm_class": ("RMSNorm", "FusedRMSNorm"), "_mlp_class": ("LLaMAMLP",), "bias": (False,),
                   "parallel_residual": (False,), "shared_attention_norm": (False,), "condense_ratio": (1,)}
    _check_supported("SMDM", fields, unsupported)
    rows, n_embd = state["transformer.wte.weight"].shape
    n_head = int(fields["n_head"])
    head = n_embd // n_head
    qkv_rows = state["transformer.h.0.attn.attn.weight"].shape[0]
    groups = int(fields.get("n_query_groups") or (qkv_rows // head - n_head) // 2)
    if n_embd % n_head or groups < 1 or n_head % groups or (n_head + 2 * groups) * head != qkv_rows:
        raise HarnessError(f"smdm weights in '{path}' do not fit n_head={n_head}, n_query_groups={groups}")
    n_layer = int(fields.get("n_layer") or _count_layers(state, r"transformer\.h\.(\d+)\."))
    cfg = BidirectionalConfig(
        vocab_size=rows, hidden_size=n_embd, n_layers=n_layer, n_heads=n_head, n_kv_heads=groups,
        intermediate_size=state["transformer.h.0.mlp.swiglu.w1.weight"].shape[0],
        output_size=state["lm_head.weight"].shape[0], rope_theta=10000.0,
        rope_fraction=float(fields.get("rotary_percentage", 1.0)), norm_eps=float(fields.get("norm_eps", 1e-5)),
        max_length=int(fields.get("block_size", 2048)), rope_cache_dtype=rope_cache_dtype)
    names = {"norm_1.weight": "attn_norm.weight", "attn.proj.weight": "attn.o.weight",
             "norm_2.weight": "mlp_norm.weight", "mlp.swiglu.w1.weight": "mlp.gate.weight",  # xformers
             "mlp.swiglu.w2.weight": "mlp.up.weight", "mlp.swiglu.w3.weight": "mlp.down.weight"}  # SwiGLU
    src = {"transformer.wte.weight": "embed.weight", "transformer.ln_f.weight": "norm.weight",
           "lm_head.weight": "head.weight"}
    src.update({f"transformer.h.{i}.{a}": f"layers.{i}.{b}" for i in range(n_layer) for a, b in names.items()})
    qkv = {f"transformer.h.{i}.attn.attn.weight": i for i in range(n_layer)}
    _check_keys("smdm", path, set(src) | set(qkv), set(state))
    ours = {dst: state[s] for s, dst in src.items()}
    q_per_kv = n_head // groups
    for key, i in qkv.items():
        # lit-gpt packs each query group as [q_per_kv queries, 1 key, 1 value], head by head.
        w = state[key].view(groups, q_per_kv + 2, head, n_embd)
        ours[f"layers.{i}.attn.q.weight"] = w[:, :q_per_kv].reshape(-1, n_embd)
        ours[f"layers.{i}.attn.k.weight"] = w[:, q_per_kv].reshape(-1, n_embd)
        ours[f"layers.{i}.attn.v.weight"] = w[:, q_per_kv + 1].reshape(-1, n_embd)
    model = _own_model(cfg, ours, dtype, "smdm", path)
    tok = _tokenizer(tokenizer, path, SMDM_TOKENIZER)
    return model, tok, rows - 1, False, cfg.max_length  # mask: the extra embedding row (32000)


def _load_llada(path: Path, dtype: torch.dtype, tokenizer: str | None, config: Any) -> tuple:
    c = _read_json(_directory(path) / "config.json")
    if not c:
        raise HarnessError(f"llada checkpoint '{path}' has no config.json beside its weights")
    wanted = {"block_type": ("llama",), "activation_type": ("silu",), "layer_norm_type": ("rms",),
              "rope": (True,), "alibi": (False,), "include_bias": (False,), "include_qkv_bias": (False,),
              "input_emb_norm": (False,), "scale_logits": (False,), "attention_layer_norm": (False,),
              "block_group_size": (1,)}
    _check_supported("LLaDA", c, wanted)
    try:
        d, n_layers, n_heads = c["d_model"], c["n_layers"], c["n_heads"]
        cfg = BidirectionalConfig(
            vocab_size=c.get("embedding_size") or c["vocab_size"], hidden_size=d, n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=c.get("n_kv_heads") or n_heads,
            intermediate_size=c.get("mlp_hidden_size") or c["mlp_ratio"] * d,
            rope_theta=float(c.get("rope_theta", 10000.0)), norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(c.get("weight_tying", False)), max_length=c.get("max_sequence_length", 4096))
    except KeyError as exc:
        raise HarnessError(f"llada config.json in '{path}' lacks {exc.args[0]}") from exc
    names = {"attn_norm": "attn_norm", "q_proj": "attn.q", "k_proj": "attn.k", "v_proj": "attn.v",
             "attn_out": "attn.o", "ff_norm": "mlp_norm", "ff_proj": "mlp.gate",  # silu(ff_proj x) * up_proj x
             "up_proj": "mlp.up", "ff_out": "mlp.down"}
    src = {"model.transformer.wte.weight": "embed.weight", "model.transformer.ln_f.weight": "norm.weight"}
    src.update({f"model.transformer.blocks.{i}.{a}.weight": f"layers.{i}.{b}.weight"
                for i in range(n_layers) for a, b in names.items()})
    if not cfg.tie_embeddings:
        src["model.transformer.ff_out.weight"] = "head.weight"
    state = _read_weights(_weight_files(path))
    _check_keys("llada", path, set(src), set(state))
    ours = {dst: state[s] for s, dst in src.items()}
    if cfg.tie_embeddings:
        ours["head.weight"] = ours["embed.weight"]
    model = _own_model(cfg, ours, dtype, "llada", path)
    tok = _tokenizer(tokenizer, path, "GSAI-ML/LLaDA-8B-Base")
    return model, tok, c.get("mask_token_id", 126336), False, cfg.max_length


LOADERS: dict[str, Callable[..., tuple]] = {
    "diffugpt": _load_diffugpt, "diffullama": _load_diffullama, "smdm": _load_smdm,
    "llada": _load_llada, "harness": _load_harness,
}


# --- helpers

def _own_model(cfg: BidirectionalConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
               fmt: str, path: Path) -> BidirectionalLM:
    with torch.device("meta"):  # no random init: the weights come next
        model = BidirectionalLM(cfg)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    except RuntimeError as exc:
        raise HarnessError(f"{fmt} weights in '{path}' do not fit their config: {_first_line(exc, 2)}") from exc
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model


def _causal_lm(path: Path, fmt: str, dtype: torch.dtype, model_type: str | None = None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise HarnessError(f"{fmt} checkpoint '{path}' must be a directory")
    _weight_files(path)
    model_type_found = _read_json(path / "config.json").get("model_type")
    if model_type and model_type_found != model_type:
        raise HarnessError(f"{fmt} checkpoint '{path}' has model_type {model_type_found!r}, not {model_type!r}")
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                        output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise HarnessError(f"cannot load {fmt} checkpoint '{path}': {_first_line(exc)}") from exc
    _mismatch(fmt, path, set(info.get("missing_keys", ())), set(info.get("unexpected_keys", ())))
    return lm


def _check_keys(fmt: str, path: Path, expected: set[str], found: set[str]) -> None:
    _mismatch(fmt, path, expected - found, found - expected)


def _mismatch(fmt: str, path: Path, missing: set[str], unexpected: set[str]) -> None:
    def few(keys: set[str]) -> str:
        return ", ".join(sorted(keys)[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "") or "none"

    if missing or unexpected:
        raise HarnessError(f"'{path}' does not match the {fmt} layout: missing {few(missing)}; "
                           f"unexpected {few(unexpected)}")


def _require(state: dict, fmt: str, path: Path, keys: list[str]) -> None:
    _check_keys(fmt, path, set(keys), set(state) & set(keys))


def _check_supported(what: str, fields: dict, wanted: dict[str, tuple]) -> None:
    for name, values in wanted.items():
        if name in fields and fields[name] not in values:
            raise HarnessError(f"unsupported {what} config {name}={fields[name]!r} (supported: {values[0]!r})")


def _smdm_fields(weights: Path, config: str | dict | None) -> dict[str, Any]:
    """lit-gpt fields: ``config`` > a json beside the weights > the size in the file name (mdm-1028M-...)."""
    if config is None:
        for candidate in (weights.with_suffix(".json"), weights.parent / "config.json"):
            if candidate.exists():
                config = str(candidate)
                break
    fields: dict[str, Any] = {}
    if isinstance(config, dict):
        fields = dict(config)
    elif isinstance(config, str) and config.endswith(".json"):
        if not Path(config).exists():
            raise HarnessError(f"smdm config '{config}' does not exist")
        fields = _read_json(Path(config))
    elif isinstance(config, str):
        fields = {"name": config}
    size = re.search(r"(\d+)M", str(fields.get("name", weights.name)))
    if "n_head" not in fields and size and int(size.group(1)) in SMDM_HEADS:
        fields["n_head"] = SMDM_HEADS[int(size.group(1))]
    if "n_head" not in fields:
        raise HarnessError(f"smdm checkpoint '{weights}' needs its model size: keep the release file name "
                           "(mdm-1028M-...), put a json with n_head beside it, or pass config='Diff_LLaMA_1028M'")
    return fields


def _gpt2_fields(raw: dict) -> dict[str, Any]:
    """GPT-2 fields from a mixin config.json: plain GPT-2 keys, or a GPT-2 dict nested one level down."""
    if "n_embd" not in raw and raw.get("model_type") != "gpt2":
        raw = next((v for v in raw.values() if isinstance(v, dict)
                    and ("n_embd" in v or v.get("model_type") == "gpt2")), {})
    return {k: raw[k] for k in GPT2_FIELDS if raw.get(k) is not None}


def _tokenizer(name: str | None, path: Path, fallback: str | None):
    from transformers import AutoTokenizer

    directory = _directory(path)
    if name is None:
        name = str(directory) if any((directory / f).exists() for f in TOKENIZER_FILES) else fallback
    if name is None:
        raise HarnessError(f"'{path}' holds no tokenizer; pass tokenizer=")
    offline = Path(name).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=offline)
    except (OSError, ValueError, KeyError) as exc:
        raise HarnessError(f"cannot load the tokenizer '{name}': {_first_line(exc)}") from exc


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise HarnessError(f"'{path}' is not a weight file ({', '.join(WEIGHT_SUFFIXES)})")
        return [path]
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            return sorted({path / f for f in _read_json(path / index).get("weight_map", {}).values()})
    for suffix in WEIGHT_SUFFIXES:
        files = sorted(path.glob("*" + suffix))
        if len(files) > 1:
            raise HarnessError(f"'{path}' holds several {suffix} files and no index; name one")
        if files:
            return files
    raise HarnessError(f"'{path}' holds no weights ({', '.join('*' + s for s in WEIGHT_SUFFIXES)})")


def _read_weights(files: list[Path], keys_only: bool = False) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in files:
        try:
            if file.suffix == ".safetensors" and keys_only:
                with safe_open(str(file), "pt") as f:
                    state.update(dict.fromkeys(f.keys()))
            elif file.suffix == ".safetensors":
                state.update(load_file(str(file)))
            else:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for wrapper in ("model", "state_dict"):  # lit-gpt / Lightning checkpoints nest the weights
                    if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
                        loaded = loaded[wrapper]
                state.update(loaded)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:
            raise HarnessError(f"cannot read weights '{file}': {_first_line(exc)}") from exc
    return state


def _local(source: str) -> Path:
    """A local path for ``source``; a hub id (``owner/repo`` or ``owner/repo/file``) is downloaded."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    parts = source.strip("/").split("/")
    if source.startswith((".", "/", "~")) or len(parts) < 2:
        raise HarnessError(f"checkpoint '{source}' does not exist")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if repo.lower() == "nieshen/smdm" and not filename:
        raise HarnessError("nieshen/SMDM holds many checkpoints; name one, e.g. "
                           "nieshen/SMDM/mdm_safetensors/mdm-1028M-1600e18.safetensors")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if filename:
            return Path(hf_hub_download(repo, filename))
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as exc:  # network, auth and missing-repo errors all end here
        raise HarnessError(f"cannot fetch '{source}' from the Hugging Face hub: {_first_line(exc)}") from exc


def _repo_id(source: str) -> str:
    return "/".join(source.strip("/").split("/")[:2]).lower()


def _directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read '{path}': {_first_line(exc)}") from exc
    if not isinstance(value, dict):
        raise HarnessError(f"'{path}' must hold a JSON object")
    return value


def _count_layers(state: dict, pattern: str) -> int:
    found = [int(m.group(1)) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.lm.get_input_embeddings() if isinstance(model, FullAttention) else model.embed


def _hf_max_length(config: Any) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


def _first_line(exc: BaseException, lines: int = 1) -> str:
    text = " ".join(str(exc).strip().splitlines()[:lines]).strip()
    return text or type(exc).__name__
