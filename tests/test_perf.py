"""harness bench: percentiles, token counting, the probe, records in the store, vLLM and CUDA skips."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.errors import HarnessError
from harness.perf import sweep as bench_sweep
from harness.perf.command import DEFAULTS, bench_options
from harness.perf.sweep import bench_model, hardware_tag
from harness.perf.untrained import is_untrained, untrained_dlm
from harness.perf.probe import probe
from harness.perf.throughput import Setting, count_generated, sweep, synthetic_prompts
from harness.perf.timing import ForwardCounter, ForwardTimer, PeakMemory, percentile, summary
from harness.store import Store

RECORD_FIELDS = {"variant", "backend", "setting", "fingerprint", "tokens_per_s", "latency_s", "first_token_s", "nfe",
                 "processed_tokens", "generated_tokens", "peak_memory_bytes", "peak_memory_source", "mfu",
                 "bandwidth_fraction", "peak_flops", "peak_bandwidth", "hardware", "prompt_source", "untrained"}
TINY = {**DEFAULTS, "gen_length": [5], "steps": [5, 2], "batch_size": [2], "prompt_length": [6], "repeats": 2,
        "warmup": 1}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_percentiles_on_known_numbers():
    values = [50, 15, 40, 20, 35]
    assert percentile(values, 0) == 15 and percentile(values, 100) == 50
    assert percentile(values, 50) == 35
    assert percentile(values, 95) == pytest.approx(48.0)  # rank 3.8: 40 + 0.8 * (50 - 40)
    assert summary([2.0]) == {"p50": 2.0, "p95": 2.0, "mean": 2.0, "n": 1}
    draws = np.random.default_rng(0).exponential(size=37).tolist()
    for q in (5, 50, 95, 99):
        assert percentile(draws, q) == pytest.approx(np.percentile(draws, q))


def test_counted_tokens_stop_at_eos_and_skip_padding():
    eos = 9
    new = torch.tensor([[4, 5, 6, 7],   # no EOS: all four count
                        [4, eos, eos, eos],  # EOS then padding: two count
                        [eos, eos, eos, eos]])  # EOS at once: one counts
    assert count_generated(new, eos) == 4 + 2 + 1
    assert count_generated(new, None) == 12


def test_sweep_varies_one_axis_at_a_time_or_all():
    options = {"gen_length": [64, 128], "steps": [8, 16], "batch_size": [1], "prompt_length": [32]}
    assert sweep(options) == [Setting(64, 32, 1, 8), Setting(128, 32, 1, 8), Setting(64, 32, 1, 16)]
    assert len(sweep({**options, "grid": "product"})) == 4
    with pytest.raises(HarnessError, match="grid"):
        sweep({**options, "grid": "diagonal"})


def test_synthetic_prompts_have_the_length_and_repeat_with_the_seed():
    ids = list(range(50))
    prompts = synthetic_prompts(ids, 80, 3, seed=7)
    assert [len(p) for p in prompts] == [80] * 3
    assert prompts == synthetic_prompts(ids, 80, 3, seed=7) != synthetic_prompts(ids, 80, 3, seed=8)


def test_probe_returns_positive_numbers():
    limits = probe("cpu", "float32", repeats=2, budget_s=0.5)
    assert limits["peak_flops"] > 1e8 and limits["peak_bandwidth"] > 1e8


def test_cpu_peak_memory_sees_an_allocation():
    with PeakMemory("cpu") as peak:
        block = torch.ones(64 * 2**20 // 4)
        del block
    assert peak.bytes > 64 * 2**20 and peak.source.startswith("cpu_peak_rss")


def test_forward_counter_counts_calls_and_positions():
    class Echo(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    echo = Echo()
    with ForwardCounter(echo) as counter:
        echo(torch.zeros(2, 3))
        echo(input_ids=torch.zeros(1, 5))
    echo(torch.zeros(4, 4))  # after the block: not counted
    assert (counter.calls, counter.tokens) == (2, 11)
    with ForwardTimer(echo, "cpu") as timer:
        echo(torch.zeros(1))
    assert timer.calls == 1 and 0 < timer.seconds < 1


def test_bench_stores_records_for_ar_and_dlm(tiny_llama_dir, tiny_dlm_dir, tmp_path):
    runs = {}
    for model in (tiny_llama_dir, tiny_dlm_dir):
        run_id, records = bench_model(str(model), TINY, suite=None, output=tmp_path, device="cpu", dtype=None,
                                      seed=1, data_dir=None, log=lambda *a: None)
        runs[run_id] = records
    ar, dlm = runs.values()
    assert {r["variant"] for r in ar} == {"kv_cache", "no_cache"}
    assert [(r["variant"], r["setting"]["steps"]) for r in dlm] == [
        ("llada", 5), ("llada", 2), ("diffugpt", 5), ("diffugpt", 2), ("threshold", None)]
    for record in ar + dlm:
        assert RECORD_FIELDS <= set(record)
        assert record["generated_tokens"] == 2 * 5  # batch x gen_length: prompt tokens never count
        assert record["tokens_per_s"] > 0 and record["mfu"] > 0 and record["bandwidth_fraction"] > 0
        assert record["hardware"]["cpu_cores"] and record["hardware"]["torch"] and record["hardware"]["dtype"]
        assert record["prompt_source"] == "builtin:repeated-sentence"
        assert record["first_token_kind"] == ("first_step" if record["backend"] == "diffusion" else "first_token")
    kv, no_cache = ar
    assert kv["nfe"] == no_cache["nfe"] == 5
    assert kv["processed_tokens"] == 2 * (6 + 5 - 1)  # prefill, then one position a step
    assert no_cache["processed_tokens"] == 2 * sum(6 + i for i in range(5))  # each step reruns the sequence
    llada_2 = dlm[1]
    assert llada_2["nfe"] == 2 and llada_2["processed_tokens"] == 2 * 2 * (6 + 5)  # whole canvas each step
    store = Store(tmp_path / "store.sqlite")
    assert {r["run_id"] for r in store.runs(kind="throughput")} == set(runs)
    again, _ = bench_model(str(tiny_llama_dir), TINY, suite=None, output=tmp_path, device="cpu", dtype=None,
                           seed=1, data_dir=None, log=lambda *a: None)
    assert len(store.measurements(again)) == 2  # resumed: nothing measured twice


def test_untrained_dlm_is_built_once_and_labelled(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    path = untrained_dlm(str(tiny_llama_dir))
    assert path.parent.parent == tmp_path / "cache" and is_untrained(str(path))
    config = json.loads((path / "diffusion_config.json").read_text())
    assert config["kind"] == "shifted" and config["mask_token_id"] == 300  # added after the 300-token vocabulary
    built = (path / "model.safetensors").stat().st_mtime_ns
    assert untrained_dlm(str(tiny_llama_dir)) == path and (path / "model.safetensors").stat().st_mtime_ns == built
    options = {**TINY, "samplers": ["threshold"], "repeats": 1, "warmup": 0}
    _, (record,) = bench_model(f"untrained-dlm:{tiny_llama_dir}", options, suite=None, output=tmp_path, device="cpu",
                               dtype=None, seed=1, data_dir=None, log=lambda *a: None)
    assert record["untrained"] and record["model"].startswith("untrained-dlm:")
    assert not is_untrained(str(tiny_llama_dir))


def test_run_id_names_the_hardware(tiny_llama_dir, tmp_path, monkeypatch):
    options = {**TINY, "ar_modes": ["kv_cache"], "repeats": 1, "warmup": 0}
    here, _ = bench_model(str(tiny_llama_dir), options, suite=None, output=tmp_path, device="cpu", dtype=None,
                          seed=1, data_dir=None, log=lambda *a: None)
    real = bench_sweep.hardware_fingerprint
    monkeypatch.setattr(bench_sweep, "hardware_fingerprint", lambda env, dtype: {**real(env, dtype), "gpu": "NVIDIA H100"})
    there, _ = bench_model(str(tiny_llama_dir), options, suite=None, output=tmp_path, device="cpu", dtype=None,
                           seed=1, data_dir=None, log=lambda *a: None)
    assert here != there and "-h100-" in there
    assert hardware_tag({"cpu": "AMD EPYC 7B13", "cpu_cores": 2}) == "amdepyc7b13-2c"


def test_speed_quality_pairs_each_setting_with_a_score(tiny_llama_dir, tiny_dlm_dir, data_dir, tmp_path):
    options = {**TINY, "samplers": ["llada"], "ar_modes": ["kv_cache"], "batch_size": [1], "repeats": 1,
               "quality": {"task": "lambada_gen", "limit": 2, "task_options": {"length": "fixed", "max_tokens": 5}}}
    for model in (tiny_llama_dir, tiny_dlm_dir):
        _, records = bench_model(str(model), options, suite=None, output=tmp_path, device="cpu", dtype=None,
                                 seed=1, data_dir=data_dir, log=lambda *a: None)
        for record in records:
            quality = record["quality"]
            assert quality["task"] == "lambada_gen" and quality["metric"] == "acc" and quality["n"] == 2
            assert 0 <= quality["value"] <= 1 and "stderr" in quality
    dlm_runs = {r["quality"]["run_id"] for r in records}
    assert len(dlm_runs) == 2  # one eval run per number of steps
    assert all(r["kind"] == "eval" for r in Store(tmp_path / "store.sqlite").runs() if r["run_id"] in dlm_runs)


def test_suites_are_throughput_suites_with_known_options():
    for name in ("throughput-quick", "throughput", "speed-quality"):
        options = bench_options(name, {})
        assert options["models"] and sweep(options)
    assert bench_options("speed-quality", {})["quality"]["limit"] == 10  # the suite's limit
    with pytest.raises(HarnessError, match="not a throughput suite"):
        bench_options("accuracy-quick", {})


def test_bench_command_line(tiny_dlm_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "--model", str(tiny_dlm_dir), "--output",
                           str(tmp_path), "--gen-length", "4", "--steps", "2", "--prompt-length", "4", "--samplers",
                           "llada", "--repeats", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    (run,) = Store(tmp_path / "store.sqlite").runs(kind="throughput")
    lines = (tmp_path / run["run_id"] / "measurements.jsonl").read_text().splitlines()
    (record,) = [json.loads(line) for line in lines]
    assert (record["variant"], record["warmup"], record["setting"]["steps"]) == ("llada", 0, 2)
    assert run["env"]["probe"]["peak_flops"] > 0


def test_vllm_is_refused_with_a_reason_off_cuda():
    from harness.perf.vllm_ar import unavailable, vllm_variant

    assert "CUDA" in unavailable("cpu")
    with pytest.raises(HarnessError, match="CUDA"):
        vllm_variant("unused", device="cpu", dtype="float32", seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM runs on CUDA only")
def test_vllm_generates_exactly_gen_length(tiny_llama_dir):
    pytest.importorskip("vllm", reason="vllm is not installed")
    from harness.perf.vllm_ar import vllm_variant

    variant = vllm_variant(str(tiny_llama_dir), device="cuda", dtype="float32", seed=0)
    assert variant.run([[5, 6, 7]] * 2, Setting(gen_length=8, prompt_length=3, batch_size=2)) == 16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_memory_and_probe():
    with PeakMemory("cuda") as peak:
        block = torch.ones(2**24, device="cuda")
        del block
    assert peak.bytes >= 2**26 and peak.source == "cuda_max_memory_allocated"
    limits = probe("cuda", "bfloat16", repeats=2, budget_s=1.0)
    assert limits["peak_flops"] > 1e12 and limits["peak_bandwidth"] > 1e11
