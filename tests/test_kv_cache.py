"""Key/value caches for block decoding: the cached pass's mechanics are exact, refresh=1 is no cache."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.models.base import GenerateRequest, InfillRequest
from harness.models.diffusion.cache import BlockCache
from harness.models.diffusion.samplers import FillRequest
from harness.models.factory import build_model
from harness.models.settings import CacheSettings


@pytest.fixture(scope="module", params=["shifted", "unshifted"])
def dlm_dir(request, tiny_dlm_dir, tmp_path_factory):
    if request.param == "shifted":
        return tiny_dlm_dir
    path = tmp_path_factory.mktemp("tiny-dlm-unshifted")
    shutil.copytree(tiny_dlm_dir, path, dirs_exist_ok=True)
    config = json.loads((path / "diffusion_config.json").read_text())
    (path / "diffusion_config.json").write_text(json.dumps({**config, "kind": "unshifted"}))
    return path


FILLS = [FillRequest([1, 5, 7, 9], 8, (), "a"), FillRequest([2, 6], 8, (), "b")]


def canvas(lm):
    mask = lm.denoiser.mask_id
    rows = [list(f.prefix_ids) + [mask] * f.n_tokens for f in FILLS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [mask] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    positions = torch.tensor([[len(f.prefix_ids) + i for i in range(f.n_tokens)] for f in FILLS])
    return ids, attention, positions


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_cached_pass_over_unchanged_keys_equals_the_full_pass(dlm_dir, mode):
    lm = build_model(str(dlm_dir))
    ids, attention, positions = canvas(lm)
    cache = BlockCache(lm.denoiser.model, shifted=lm.denoiser.shifted, mask_id=lm.denoiser.mask_id, fills=FILLS,
                       block_length=4, settings=CacheSettings(mode))
    full = cache(ids, attention, positions)
    blocks = cache.current_blocks(ids, attention)
    again = cache.cached(ids.to(full.device), attention, positions if not lm.denoiser.shifted
                         else (positions - 1).clamp(min=0), blocks)
    assert cache.full_passes == 1
    # the queries are recomputed from exact keys: equal to the full pass (prefix: the block and all
    # after it; dual: the block, while the later blocks keep the full pass's logits as they are)
    assert torch.allclose(again[:, :4], full[:, :4], atol=1e-5)
    if mode == "prefix":
        assert torch.allclose(again, full, atol=1e-5)
    else:
        assert torch.equal(again[:, 4:], full[:, 4:])


@pytest.mark.parametrize("sampler, extra", [("llada", {"steps": 8, "block_length": 4}),
                                            ("threshold", {"threshold": 0.5, "block_length": 4})])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_refresh_every_step_reproduces_no_cache_exactly(dlm_dir, sampler, extra, mode, cfg_scale):
    args = {"sampler": sampler, "cfg_scale": cfg_scale, **extra}
    requests = [GenerateRequest("The quick brown fox", 8), GenerateRequest("Answer:", 8)]
    infills = [InfillRequest("def add(a, b):", "\n", 6)]
    plain = build_model(str(dlm_dir), model_args=args)
    cached = build_model(str(dlm_dir), model_args={**args, "cache": mode, "refresh": 1})
    assert [r.text for r in plain.generate(requests)] == [r.text for r in cached.generate(requests)]
    assert [r.text for r in plain.infill(infills)] == [r.text for r in cached.infill(infills)]
    assert cached.fingerprint["cache"] == {"mode": mode, "refresh": 1}


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_decoding_runs_full_passes_only_at_block_starts(dlm_dir, mode, monkeypatch):
    lm = build_model(str(dlm_dir), model_args={"sampler": "llada", "steps": 8, "block_length": 4, "cache": mode})
    made = []
    original = lm.block_cache
    monkeypatch.setattr(lm, "block_cache", lambda fills, settings: made.append(original(fills, settings)) or made[-1])
    [out] = lm.generate([GenerateRequest("The quick brown fox", 8)])
    [cache] = made
    assert (cache.full_passes, cache.cached_passes) == (2, 6)  # 2 blocks of 4 steps: 1 full + 3 cached each
    assert out.extra["steps"] == 8
