"""Samplers that fill masked spans with a masked-diffusion denoiser: generation and infilling.

Each request becomes a canvas ``prefix + [mask] * n_tokens + suffix`` (generation: no suffix); the
canvases of a call are right-padded into one batch and go through the denoiser together (see
``estimators`` for the ``denoise(input_ids, attention_mask)`` contract). Samplers only write
still-masked positions of the fill region; prefix and suffix tokens never change.

Samplers, one module each (their docstrings give the details): ``diffugpt`` (DiffuGPT/DiffuLLaMA's
``generate_samples``), ``llada`` (LLaDA's semi-autoregressive sampler), ``threshold``
(Fast-dLLM's confidence-threshold and factor parallel decoding) and ``entropy_bounded`` (the
EB-sampler). The three block samplers take the EOS options of ``common.EosOptions`` (all off by
default) and the tokenizer's ``eos_id`` / ``eot_id``.

The mask token is never proposed (its probability is spread over the others; ``diffugpt`` is the
exception). Confidence is the model's probability of the proposed token (before temperature). Row
``b`` draws its randomness from a generator seeded by ``(seed, key)`` (key defaults to the row's
index), and a row draws only at steps where it changes, so with keys given a row's output does not
depend on the other rows of the batch (up to floating-point differences between batch shapes).

Classifier-free guidance (``cfg_scale`` w > 0) adds, in the same denoiser call, an unconditional
copy of each canvas with the prefix AND suffix masked (SMDM masks the prompt; infilling also masks
the suffix) and combines them as in ``estimators.guided_logprobs``. ``nfe`` counts forward passes
per row: one per denoiser call, two with guidance; ``steps`` counts denoiser calls. Steps at which
no row would reveal anything are skipped and not counted.

Each sampler module registers its function with ``@SAMPLERS.register("name")`` (see ``common``)
and is imported below, which is what registers it: a new sampler is one new file plus its import
line here. Samplers are listed in import order.
"""
from __future__ import annotations

from harness.models.diffusion.samplers.common import SAMPLERS, FillRequest, SampleOutput
from harness.models.diffusion.samplers.diffugpt import diffugpt_sample
from harness.models.diffusion.samplers.llada import REMASKING, llada_sample
from harness.models.diffusion.samplers.threshold import threshold_sample
from harness.models.diffusion.samplers.entropy_bounded import entropy_bounded_sample

__all__ = ["REMASKING", "SAMPLERS", "FillRequest", "SampleOutput", "diffugpt_sample", "entropy_bounded_sample",
           "llada_sample", "threshold_sample"]
