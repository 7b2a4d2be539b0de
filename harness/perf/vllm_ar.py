"""Optional vLLM variant for AR throughput on CUDA (``ar_modes: [..., vllm]``).

vLLM is imported here only, when the variant is asked for; without CUDA or without the package
``vllm_variant`` raises a HarnessError that says why (``harness bench`` prints it and goes on).
Requests are greedy with ``min_tokens = max_tokens = gen_length`` and ``ignore_eos``, so every row
generates exactly gen_length tokens, as the Hugging Face variants do. vLLM's forward calls cannot be
hooked: ``nfe`` is gen_length (one engine step a token, the whole batch in each) and
``processed_tokens`` batch x (prompt + gen - 1). The engine runs in this process, so the CUDA peak
memory includes the KV cache vLLM preallocates (``gpu_memory_utilization``).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from harness.errors import HarnessError
from harness.models.loading import torch_dtype
from harness.perf.throughput import Setting, Variant, weights_of
from harness.perf.timing import is_cuda


def unavailable(device: str) -> str | None:
    """Why the vLLM variant cannot run here, or None."""
    if not is_cuda(device) or not torch.cuda.is_available():
        return f"the vllm variant needs a CUDA device (this run uses '{device}')"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "the vllm variant needs the 'vllm' package (pip install vllm)"
    return None


def vllm_variant(weights: str, *, device: str, dtype: str, seed: int, gpu_memory_utilization: float = 0.8) -> Variant:
    """A ``vllm`` variant over the Hugging Face checkpoint directory (or hub id) ``weights``."""
    reason = unavailable(device)
    if reason:
        raise HarnessError(reason)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # keep the engine in this process
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=weights, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization)

    def generate(prompts: list[list[int]], new: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new, ignore_eos=True, detokenize=False)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    params, _ = weights_of(_meta_model(weights))
    weight_bytes = params * torch_dtype(dtype).itemsize

    def describe(setting: Setting) -> dict[str, Any]:
        return {"backend": "vllm", "weights": weights, "dtype": dtype, "device": device, "seed": seed,
                "vllm": vllm.__version__, "gpu_memory_utilization": gpu_memory_utilization}

    return Variant("vllm", "vllm", run=lambda p, s: generate(p, s.gen_length), first=lambda p, s: generate(p, 1),
                   params=params, weight_bytes=weight_bytes,
                   counts=lambda s: (s.gen_length, s.batch_size * (s.prompt_length + s.gen_length - 1)),
                   describe=describe)


def _meta_model(weights: str) -> torch.nn.Module:
    """The architecture without weights, to count parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(weights))
