"""Served (endpoint) measurements beside local ones: one table per model with a row per
(hardware, backend), the serving table per hardware, served hardware labels, hostile records,
the report and the speed-quality figure."""
import pytest

from harness.report.collect import collect_measurements, hardware_label
from harness.report.commands import build_sections, leaderboard, report
from harness.report.hardware import hardware_tables, measurement_tables
from harness.report.plots import speed_quality_figures
from harness.report.serving import serving_tables, side_by_side_tables
from harness.store import Store
from test_reports import ENV

MODEL = "smollm2-135m"
H200 = {"cpu": "Intel Xeon Platinum 8468", "cpu_cores": 16, "memory_gb": 128.0, "gpu": "NVIDIA H200",
        "gpu_count": 1, "gpu_memory_gb": 139.8, "cuda": "12.8", "driver": "570.124"}
SERVER_HW = {"gpu": "NVIDIA H200", "gpu_count": 1, "source": "reported"}
URL = "http://10.0.0.5:8000/v1"
QUALITY = {"task": "gsm8k", "metric": "exact_match_strict", "value": 0.31, "stderr": 0.07, "n": 40}


def local_record(batch, tokens_per_s, p50, first, quality=None):
    record = {"model": MODEL, "backend": "hf_ar", "variant": "kv_cache", "tokens_per_s": tokens_per_s,
              "setting": {"gen_length": 128, "steps": None, "batch_size": batch, "prompt_length": 64},
              "latency_s": {"p50": p50, "p95": p50 * 1.1, "mean": p50}, "first_token_s": {"p50": first, "p95": first},
              "nfe": 128, "hardware": {**H200, "torch": "2.13.0", "dtype": "bfloat16"}}
    return {**record, "quality": quality} if quality else record


def served_record(concurrency, tokens_per_s, ttft, tpot, itl99, e2e, quality=None):
    record = {"key": f"c{concurrency}", "kind": "serving", "model": MODEL, "backend": "vllm", "served": True,
              "endpoint": URL, "api": "completions", "variant": f"concurrency {concurrency}",
              "setting": {"request_rate": "inf", "max_concurrency": concurrency, "num_prompts": 16,
                          "input_words": [32, 128], "output_tokens": [16, 64], "streaming": True},
              "dtype": "—", "completed": 16, "failed": 0, "errors": [], "duration_s": 3.2,
              "request_throughput": tokens_per_s / 40, "tokens_per_s": tokens_per_s, "total_tokens_per_s": 900.0,
              "latency_s": {"mean": e2e, "p50": e2e, "p95": e2e * 1.2, "p99": e2e * 1.5},
              "first_token_s": {"mean": ttft, "p50": ttft, "p95": ttft * 2, "p99": ttft * 3},
              "tpot_s": {"mean": tpot, "p50": tpot, "p95": tpot, "p99": tpot},
              "itl_s": {"mean": tpot, "p50": tpot, "p95": itl99, "p99": itl99}, "tokens_per_chunk": 1.0,
              "stream_unit": "token", "hardware": SERVER_HW, "client": {"cpu": "AMD EPYC 7B13", "cpu_cores": 2},
              "server": {"engine": "vllm", "version": "0.11.0", "model": MODEL, "max_model_len": 2048}, "seed": 1234}
    return {**record, "quality": quality} if quality else record


def add_run(store, run_id, kind, fingerprint, records, env=ENV):
    store.start_run(run_id, model=MODEL, config={"model": MODEL}, fingerprint={"name": MODEL, **fingerprint},
                    env=env, output_dir="", kind=kind)
    for record in records:
        store.add_measurement(run_id, record)
    store.finish_run(run_id)
    return store.run(run_id)


def served_fp(engine="vllm"):
    return {"backend": engine, "served": True, "endpoint": URL, "server": {"engine": engine, "version": "0.11.0"}}


def make_store(path, local_quality=None):
    store = Store(path)
    local = add_run(store, "bench-local", "throughput", {"backend": "hf_ar", "dtype": "bfloat16"},
                    [local_record(1, 250.0, 0.52, 0.02, local_quality), local_record(4, 900.0, 0.57, 0.03)],
                    env={**ENV, "hardware": H200})
    served = add_run(store, "bench-served", "serving", served_fp(),
                     [served_record(1, 180.0, 0.045, 0.0052, 0.0091, 0.7),
                      served_record(4, 610.0, 0.08, 0.0065, 0.012, 0.9, QUALITY)])
    return store, [local, served]


@pytest.fixture()
def built(tmp_path):
    return make_store(tmp_path / "store.sqlite")


def test_collected_records_say_served_or_local_and_flatten_latencies(built):
    store, runs = built
    local, _, one, four = collect_measurements(store, runs)
    assert (local["mode"], local["backend_label"], one["mode"], one["backend_label"]) == (
        "local", "HF eager", "served", "vLLM (served)")
    assert local["tpot_p50_s"] == pytest.approx((0.52 - 0.02) / 127) and local["ttft_s"] == 0.02
    assert (one["tpot_p50_s"], one["itl_p99_s"], one["ttft_p99_s"]) == (0.0052, 0.0091, pytest.approx(0.135))
    assert one["latency_p99_s"] == pytest.approx(1.05) and one["key"] == "c1" and one["dtype"] == "–"
    assert one["hardware_label"] == local["hardware_label"] == "NVIDIA H200"
    assert one["setting_label"] == ("rate inf/s · concurrency 1 · 16 prompts · in 32–128 words · out 16–64 tokens · "
                                    "streamed")
    assert four["quality"]["spec"].label == "exact_match_strict (%)"


def test_local_and_served_are_two_rows_of_one_table(built):
    store, runs = built
    (table,) = side_by_side_tables(collect_measurements(store, runs))
    assert table.title == f"Local and served: {MODEL} by hardware and backend"
    assert table.header == ["Hardware", "Backend", "Single-stream tok/s", "Best tok/s", "Best at", "TTFT p50 (s)",
                            "TPOT p50 (ms)", "e2e p50 (s)", "Quality"]
    tpot = (0.52 - 0.02) / (128 - 1) * 1000
    assert f"{tpot:.2f}" == "3.94"
    assert table.rows == [
        ["H1 NVIDIA H200", "HF eager", "250.0", "900.0", "kv_cache · len 128 · batch 4 · prompt 64", "0.020", "3.94",
         "0.520", "–"],
        ["H2 NVIDIA H200", "vLLM (served)", "180.0", "610.0", "concurrency 4", "0.045", "5.20", "0.700",
         "gsm8k exact_match_strict (%) 31.0"]]


def test_the_single_stream_falls_back_to_the_fastest_batch_one_or_lowest_concurrency(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    dlm = [{**local_record(1, tps, 1.0, 0.1), "backend": "diffusion", "variant": name}
           for name, tps in (("llada", 40.0), ("threshold", 95.0))]
    runs = [add_run(store, "dlm", "throughput", {"backend": "diffusion"}, dlm, env={**ENV, "hardware": H200}),
            add_run(store, "sgl", "serving", served_fp("sglang"),
                    [{**served_record(c, tps, 0.1, 0.01, 0.02, 1.5), "backend": "sglang"}
                     for c, tps in ((8, 700.0), (2, 300.0))])]
    (table,) = side_by_side_tables(collect_measurements(store, runs))
    assert [row[1:5] for row in table.rows] == [
        ["DLM (harness)", "95.0", "95.0", "threshold · len 128 · batch 1 · prompt 64"],
        ["SGLang (served)", "300.0", "700.0", "concurrency 8"]]


def test_served_records_stay_out_of_the_local_tables_and_get_their_own(built):
    store, runs = built
    measurements = collect_measurements(store, runs)
    tables = {t.title: t for t in hardware_tables(measurements) + measurement_tables(measurements)}
    assert [row[:2] + row[-2:-1] for row in tables["Hardware fingerprints"].rows] == [
        ["H1", "NVIDIA H200", "local"], ["H2", "NVIDIA H200", "server, reported"]]
    by_setting = tables[f"Throughput of {MODEL} by hardware (tokens/s)"]
    assert by_setting.rows == [["H1 NVIDIA H200", "250.0", "900.0"]]
    assert "Measurements on H1: NVIDIA H200" in tables and not any(t.startswith("Measurements on H2") for t in tables)
    (serving,) = serving_tables(measurements)
    assert serving.title == "Serving measurements on H2: NVIDIA H200"
    assert serving.header == ["Model", "Backend", "Variant", "Requests", "req/s", "out tok/s", "TTFT p50 (s)",
                              "TTFT p99 (s)", "TPOT p50 (ms)", "ITL p99 (ms)", "e2e p50 (s)", "e2e p99 (s)",
                              "Completed", "Failed", "tok/chunk", "Stream unit", "Quality"]
    prompts = "16 prompts · in 32–128 words · out 16–64 tokens · streamed"
    assert serving.rows == [
        [MODEL, "vLLM (served)", "concurrency 1", prompts, "4.50", "180.0", "0.045", "0.135", "5.20", "9.10", "0.700",
         "1.050", "16", "0", "1.00", "token", "–"],
        [MODEL, "vLLM (served)", "concurrency 4", prompts, "15.25", "610.0", "0.080", "0.240", "6.50", "12.00",
         "0.900", "1.350", "16", "0", "1.00", "token", "gsm8k exact_match_strict (%) 31.0"]]
    assert "per chunk" in serving.settings[0] and URL in serving.settings[1]


def test_served_hardware_labels():
    assert hardware_label({"gpu": "H20", "gpu_count": 8, "source": "declared"}) == "H20 ×8 (declared)"
    assert hardware_label({"gpu": "NVIDIA H200", "gpu_count": 1, "source": "reported"}) == "NVIDIA H200"
    assert hardware_label({"source": "unknown"}) == "unknown hardware (served)"
    assert hardware_label({"source": "unknown", "cpu": "AMD EPYC 9654", "cpu_cores": 96}) == "AMD EPYC 9654 (96 cores)"
    assert hardware_label({"gpu": "A10", "gpu_count": "many"}) == "A10" and hardware_label("junk") == "unknown CPU"


def test_a_record_missing_fields_shows_dashes(tmp_path):
    store = Store(tmp_path / "store.sqlite")
    hostile = [{"variant": "concurrency 2"},
               {"model": ["odd"], "tokens_per_s": "fast", "latency_s": [1, 2], "first_token_s": None, "setting": "x",
                "hardware": "gpu", "quality": "good", "completed": "16", "tpot_s": {"p50": "slow"}}]
    runs = [add_run(store, "odd", "serving", served_fp("sglang"), hostile)]
    measurements = collect_measurements(store, runs)
    assert {m["hardware_label"] for m in measurements} == {"unknown hardware (served)"}
    (first, second) = serving_tables(measurements)[0].rows
    assert first[:3] == [MODEL, "SGLang (served)", "concurrency 2"] and set(first[4:]) == {"–"}
    assert second[0] == "['odd']" and set(second[2:]) == {"–", "default"}
    rows = [row for table in side_by_side_tables(measurements) for row in table.rows]
    assert all(set(row[2:]) == {"–"} for row in rows)
    build_sections(store, runs)  # the whole report builds


def test_the_report_shows_both_rows(built, tmp_path):
    store, _ = built
    report([], all_runs=True, out=tmp_path / "report", store=store.path, output=tmp_path)
    md = (tmp_path / "report" / "index.md").read_text()
    html = (tmp_path / "report" / "index.html").read_text()
    assert "| H1 NVIDIA H200 | HF eager | 250.0 | 900.0 |" in md
    assert "| H2 NVIDIA H200 | vLLM (served) | 180.0 | 610.0 |" in md
    assert "## Serving measurements" in md and "Serving measurements on H2: NVIDIA H200" in md
    assert "HF eager" in html and "vLLM (served)" in html
    titles = [s.title for s in build_sections(store, store.runs())]
    assert titles.index("Hardware") < titles.index("Serving measurements") < titles.index("Throughput measurements")
    leaderboard(out=tmp_path / "site", store=store.path, output=tmp_path)
    page = (tmp_path / "site" / "runs" / "bench-served.html").read_text()
    assert "Serving measurements on H1: NVIDIA H200" in page and "concurrency 4" in page


def test_served_points_share_the_speed_quality_figure(tmp_path):
    store, runs = make_store(tmp_path / "store.sqlite", local_quality={**QUALITY, "value": 0.29})
    (pareto,) = speed_quality_figures(collect_measurements(store, runs))
    assert pareto.title == "Speed vs quality: gsm8k on H1, H2 NVIDIA H200" and pareto.png[:4] == b"\x89PNG"
    assert pareto.table.header[:5] == ["Model", "Backend", "Variant", "Setting", "tokens/s"]
    assert [row[1:3] + row[4:] for row in pareto.table.rows] == [
        ["HF eager", "kv_cache", "250.0", "29.0 ± 7.0"], ["vLLM (served)", "concurrency 4", "610.0", "31.0 ± 7.0"]]
