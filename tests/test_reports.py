"""Reports, leaderboard, reproduction view and paired comparison, on a store built through the Store API."""
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from harness.errors import HarnessError
from harness.report.collect import collect_cells, collect_measurements, select_runs
from harness.report.commands import build_sections, compare, leaderboard, report
from harness.report.compare import dlm_vs_ar, paired
from harness.report.hardware import hardware_tables, measurement_tables
from harness.report.reference import known_parents, load_papers, references, reproduction
from harness.report.tables import leaderboards, metric_boards
from harness.scoring.metric import fraction_metrics
from harness.scoring.metrics import aggregate
from harness.store import Store
from harness.hashing import stable_hash

ENV = {"packages": {"dlm-harness": "0.1.0", "torch": "2.13.0", "transformers": "4.57.1"}, "git_sha": "0fe2d32" * 6,
       "python": "3.11.2", "hardware": {"cpu": "AMD EPYC 7B13", "cpu_cores": 2, "memory_gb": 8.0}}
H100 = {"cpu": "Intel Xeon Platinum 8480+", "cpu_cores": 16, "memory_gb": 128.0, "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_count": 1, "gpu_memory_gb": 79.1, "cuda": "12.4", "driver": "550.54"}
A100 = {**H100, "gpu": "NVIDIA A100-SXM4-40GB", "gpu_memory_gb": 39.4, "driver": "535.104"}
AR_FP = {"backend": "hf_ar", "dtype": "float32", "device": "cpu", "batch_size": 16, "infill_mode": "prefix"}
DLM_FP = {"backend": "diffusion", "dtype": "float32", "device": "cpu", "batch_size": 16, "kind": "shifted",
          "estimator": {"method": "paper_grid", "samples": 32, "eps": 0.001, "cfg_scale": 0.0},
          "sampler": {"name": "diffugpt", "steps": 64, "block_length": None, "temperature": 0.0}, "seed": 1234}
N = 60
# per-task accuracy of each model, near the published Table 1 numbers
ACCURACY = {"gpt2": {"piqa": 0.62, "hellaswag": 0.30}, "gpt2-medium": {"piqa": 0.67, "hellaswag": 0.38},
            "diffugpt-s": {"piqa": 0.58, "hellaswag": 0.33}}


def doc_outcomes(model: str, task: str) -> list[float]:
    rng = np.random.default_rng(int(stable_hash([model, task]), 16))
    hits = round(ACCURACY[model][task] * N)
    return list(rng.permutation([1.0] * hits + [0.0] * (N - hits)))


def add_eval_run(store, model, fingerprint, *, tasks=("piqa", "hellaswag"), suite="accuracy-quick", seed=1234,
                 prompt_salt="", outcomes=None, env=ENV):
    run_id = f"{model}-{stable_hash([model, fingerprint, tasks, prompt_salt, seed])[:12]}"
    store.start_run(run_id, model=model, config={"model": model, "tasks": list(tasks), "suite": suite, "seed": seed,
                                                 "limit": N, "model_args": {}},
                    fingerprint={**fingerprint, "name": model, "weights": model}, env=env, output_dir="")
    for task in tasks:
        values = outcomes[task] if outcomes else doc_outcomes(model, task)
        items = []
        for doc_id, acc in enumerate(values):
            arguments = [{"context": f"{task} question {doc_id}{prompt_salt}", "continuation": f" answer {k}",
                          "group": str(doc_id)} for k in range(2)]
            items.append((doc_id, {"acc": acc, "acc_norm": acc},
                          {"doc_id": doc_id, "arguments": arguments, "prompt_hash": stable_hash(arguments)}))
        store.add_records(run_id, task, items)
        records = store.records(run_id, task)
        specs = fraction_metrics("acc", "acc_norm")  # as the multiple-choice tasks declare them
        store.set_task_result(run_id, task, task_hash=stable_hash([task, "v1"]),
                              prompt_hash=stable_hash([r["prompt_hash"] for _, _, r in records]), n=len(records),
                              metrics=aggregate([m for _, m, _ in records], specs),
                              settings={"task": task, "version": 1, "options": {}}, specs=specs.to_list(),
                              output_type="multiple_choice")
    store.finish_run(run_id)
    return run_id


def add_throughput_run(store, model, fingerprint, hardware, points, flat=False):
    """Records shaped as `harness bench` writes them, or (``flat``) with flat, differently named keys."""
    run_id = f"bench-{model}-{stable_hash([model, hardware])[:8]}"
    store.start_run(run_id, model=model, config={"model": model}, fingerprint={**fingerprint, "name": model},
                    env={**ENV, "hardware": hardware}, output_dir="", kind="throughput")
    for steps, tokens_per_s, quality in points:
        latency = 256 / tokens_per_s
        record = {"model": model, "backend": fingerprint["backend"], "tokens_per_s": tokens_per_s, "nfe": steps or 256,
                  "setting": {"gen_length": 256, "prompt_length": 128, "batch_size": 1, "steps": steps}, "mfu": 0.12}
        if flat:
            record.update(sampler=(fingerprint.get("sampler") or {}).get("name"), latency_p50_s=latency,
                          latency_p95_s=1.1 * latency, peak_memory_mb=2048.0)
        else:
            record.update(variant=(fingerprint.get("sampler") or {}).get("name") or "kv_cache",
                          latency_s={"p50": latency, "p95": 1.1 * latency, "mean": latency},
                          first_token_s={"p50": 0.01}, peak_memory_bytes=2048 * 2**20,
                          hardware={**hardware, "torch": "2.13.0", "transformers": "4.57.1",
                                    "dtype": fingerprint["dtype"]})
        if quality is not None:
            record["quality"] = {"task": "gsm8k", "metric": "exact_match_strict", "value": quality, "n": 40}
        store.add_measurement(run_id, record)
    store.finish_run(run_id)
    return run_id


def make_store(path):
    """An AR pair, a DLM with estimator settings, and throughput runs on two GPUs (one with quality)."""
    store = Store(path)
    ids = {model: add_eval_run(store, model, DLM_FP if model.startswith("diffu") else AR_FP) for model in ACCURACY}
    ids["bench-dlm"] = add_throughput_run(store, "diffugpt-s", DLM_FP, H100,
                                          [(16, 410.0, 0.21), (32, 220.0, 0.29), (64, 118.0, 0.33), (128, 61.0, 0.34)])
    ids["bench-ar"] = add_throughput_run(store, "gpt2", AR_FP, H100, [(None, 950.0, 0.30)])
    ids["bench-a100"] = add_throughput_run(store, "diffugpt-s", DLM_FP, A100, [(64, 80.0, None)], flat=True)
    return store, ids


@pytest.fixture()
def built(tmp_path):
    store, ids = make_store(tmp_path / "store.sqlite")
    return store, ids, tmp_path


def test_report_writes_markdown_and_html_from_the_store_only(built):
    store, ids, tmp_path = built
    report([], all_runs=True, out=tmp_path / "report", store=store.path, output=tmp_path)
    md = (tmp_path / "report" / "index.md").read_text()
    html = (tmp_path / "report" / "index.html").read_text()
    for heading in ("Leaderboard", "DLM vs AR", "Paper reproduction", "Speed and quality", "Hardware"):
        assert f"## {heading}" in md and f"<h2>{heading}</h2>" in html
    assert "paper_grid ×32" in md and "n=60" in md and "0-shot" in md and "torch 2.13.0" in md
    # per-task bars of the suite, the H100 Pareto plot, the steps curve, tokens/s across hardware
    assert html.count("data:image/png;base64,") == 4
    assert html.count("<script") == 1 and "<script src" not in html  # one inline script (sorting)
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    assert len(list((tmp_path / "report" / "figures").glob("*.png"))) == 4


def test_leaderboard_has_one_row_per_model_and_separates_prompt_variants(built):
    store, ids, tmp_path = built
    cells = collect_cells(store, store.runs())
    (board,) = leaderboards(cells)
    assert sorted(row[0] for row in board.rows) == sorted(ACCURACY)
    assert board.header[-2:] == ["piqa", "hellaswag"]
    assert board.subheader[-1] == "acc (%) · n=60 · 0-shot · ↑ higher is better"
    gpt2 = next(row for row in board.rows if row[0] == "gpt2")
    assert gpt2[-2:] == ["61.7 ± 6.3", "30.0 ± 6.0"]  # to the standard error's precision
    (every,) = metric_boards(cells)
    # every other metric is one click away: a collapsed table of each (task, metric)
    assert every.collapsed and every.header[-4:] == ["piqa · acc", "piqa · acc_norm", "hellaswag · acc",
                                                     "hellaswag · acc_norm"]
    # the same task with other prompts is never merged into the same column
    add_eval_run(store, "gpt2", {**AR_FP, "dtype": "bfloat16"}, tasks=("piqa",), prompt_salt=" (other template)")
    (board,) = leaderboards(collect_cells(store, store.runs()))
    assert {"piqa (a)", "piqa (b)"} <= set(board.header)
    assert sum("piqa (b): task hash" in line for line in board.settings) == 1


def test_runs_that_differ_only_in_limit_share_a_column(built):
    store, ids, _ = built
    add_eval_run(store, "gpt2", {**AR_FP, "dtype": "bfloat16"}, tasks=("piqa",),
                 outcomes={"piqa": [1.0, 0.0] * 10})  # 20 documents, the same prompts
    (board,) = leaderboards(collect_cells(store, store.runs()))
    assert board.header[5:] == ["piqa", "hellaswag"] and "n=20/60" in board.subheader[5]
    assert not any("lettered" in line for line in board.settings)


def test_leaderboard_rows_link_to_run_pages(built):
    store, ids, _ = built
    (board,) = leaderboards(collect_cells(store, store.runs()), link=True)
    assert {(str(row[0]), row[0].href) for row in board.rows} == {
        (model, f"runs/{ids[model]}.html") for model in ACCURACY}


def test_dlm_vs_ar_deltas_pair_parent_and_best_ar(built):
    store, ids, _ = built
    cells = collect_cells(store, store.runs())
    table = dlm_vs_ar(cells, known_parents(load_papers()))
    by = {(row[0], row[4], row[5]): row for row in table.rows}
    dlm = next(c for c in cells if c.model == "diffugpt-s" and c.task == "hellaswag" and c.metric == "acc")
    best = next(c for c in cells if c.model == "gpt2-medium" and c.task == "hellaswag" and c.metric == "acc")
    parent = next(c for c in cells if c.model == "gpt2" and c.task == "hellaswag" and c.metric == "acc")
    assert by[("hellaswag", "gpt2", "parent")][8] == f"{(dlm.value - parent.value) * 100:+.1f}"
    row = by[("hellaswag", "gpt2-medium", "best AR")]
    assert row[8] == f"{(dlm.value - best.value) * 100:+.1f}"
    combined = (dlm.stderr ** 2 + best.stderr ** 2) ** 0.5
    assert row[10] == ("yes" if abs(dlm.value - best.value) > 2 * combined else "no")


def test_reproduction_lists_matched_cells_with_deltas(built):
    store, ids, _ = built
    cells = collect_cells(store, store.runs())
    refs = references(load_papers())
    table, matches = reproduction(refs, cells, collect_measurements(store, store.runs()))
    table1 = {(m.model, m.reference.column): m for m in matches if "Table 1" in m.reference.source}
    assert set(table1) == {(model, column) for model in ACCURACY for column in ("PIQA", "HellaSwag")}
    gpt2 = table1[("gpt2", "PIQA")]
    value = next(c.value for c in cells if c.model == "gpt2" and c.task == "piqa" and c.metric == "acc")
    assert gpt2.reference.value == 62.1 and gpt2.delta == pytest.approx(value * 100 - 62.1)
    assert any("60 of the 1,838" in note for note in gpt2.notes)
    assert all("Table 1" in m.reference.source for m in matches)  # no run of a LLaDA-table model
    assert not any("estimator" in note for m in matches for note in m.notes)  # paper_grid x32 as the paper
    other = [replace(c, fingerprint={**c.fingerprint, "estimator": {"method": "mc_time", "samples": 32}})
             for c in cells if c.model == "diffugpt-s"]
    _, matches = reproduction(refs, other, [])
    assert matches and all("Harness estimator mc_time ≠ paper paper_grid." in m.notes for m in matches)
    assert all(len(row) == len(table.header) for row in table.rows)


def test_reference_data_covers_table1_with_sources_and_flags():
    refs = [r for r in references(load_papers()) if r.source.endswith("Table 1")]
    assert len(refs) == 9 * 11 and all("2410.17891" in r.source for r in refs)
    cell = {(r.model, r.column): r for r in refs}
    assert cell[("GPT2-S", "ROCStories R-1")].shown == "(7.8)"
    assert any("45.0" in n for n in cell[("DiffuGPT-S", "LAMBADA")].notes)
    assert not cell[("DiffuLLaMA", "GSM8K*")].match
    assert "triviaqa_diffugpt" in cell[("GPT2-S", "TriviaQA")].tasks
    assert known_parents(load_papers())["diffugpt-s"] == "gpt2"


def test_compare_paired_mean_delta_and_warnings(built):
    store, ids, _ = built
    a = add_eval_run(store, "gpt2", AR_FP, tasks=("piqa",), suite="", seed=1,
                     outcomes={"piqa": [1.0, 0.0] * 30})
    b = add_eval_run(store, "gpt2", {**AR_FP, "device": "cuda"}, tasks=("piqa",), suite="", seed=2,
                     outcomes={"piqa": [1.0, 1.0] * 30})
    results, warnings = paired(store, store.run(a), store.run(b))
    acc = next(r for r in results if r.metric == "acc")
    assert acc.n == 60 and acc.delta == pytest.approx(0.5) and acc.low <= 0.5 <= acc.high and acc.significant
    assert warnings == []
    c = add_eval_run(store, "diffugpt-s", DLM_FP, tasks=("piqa",), prompt_salt="!", suite="", outcomes={"piqa": [1.0] * 60},
                     env={**ENV, "packages": {**ENV["packages"], "torch": "2.14.0"}})
    _, warnings = paired(store, store.run(a), store.run(c))
    text = "\n".join(warnings)
    assert "prompt hashes differ" in text and "estimator" in text and "torch 2.13.0 vs 2.14.0" in text


def test_bad_input_is_a_clear_harness_error(tmp_path, built):
    store, ids, _ = built
    with pytest.raises(HarnessError, match="no run matching 'nope'"):
        select_runs(store, ["nope"], False)
    with pytest.raises(HarnessError, match="holds no runs"):
        select_runs(Store(tmp_path / "empty.sqlite"), [], True)
    with pytest.raises(HarnessError, match="no results store"):
        leaderboard(out=tmp_path / "site", store=tmp_path / "missing.sqlite", output=tmp_path)
    with pytest.raises(HarnessError, match="share no task"):
        compare(ids["gpt2"], ids["bench-ar"], store=store.path, output=tmp_path, resamples=10, seed=0)
    cli = subprocess.run([sys.executable, "-m", "harness.cli", "report", "nope", "--out", str(tmp_path / "r"),
                          "--store", str(store.path)], capture_output=True, text=True)
    assert cli.returncode == 2 and "no run matching 'nope'" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


def test_measurements_of_both_record_shapes(built):
    store, ids, _ = built
    measurements = collect_measurements(store, store.runs())
    tables = {t.title: t for t in hardware_tables(measurements) + measurement_tables(measurements)}
    assert [row[0] for row in tables["Hardware fingerprints"].rows] == ["H1", "H2"]
    dlm = tables["Throughput of diffugpt-s by hardware (tokens/s)"]
    assert dlm.header == ["Hardware", "16 steps", "32 steps", "64 steps", "128 steps"]
    assert [row[1:] for row in dlm.rows] == [["410.0", "220.0", "118.0", "61.0"], ["–", "–", "80.0", "–"]]
    h1 = tables["Measurements on H1: NVIDIA H100 80GB HBM3"]
    assert h1.rows[0][:3] == ["diffugpt-s", "diffusion", "diffugpt"] and h1.rows[0][6] == f"{256 / 410:.3f}"
    assert tables["Measurements on H2: NVIDIA A100-SXM4-40GB"].rows[0][6] == f"{256 / 80:.3f}"


def test_leaderboard_site_links_a_page_per_run(built):
    store, ids, tmp_path = built
    leaderboard(out=tmp_path / "site", store=store.path, output=tmp_path)
    index = (tmp_path / "site" / "index.html").read_text()
    for run in store.runs():
        assert f'href="runs/{run["run_id"]}.html"' in index
        page = (tmp_path / "site" / "runs" / f"{run['run_id']}.html").read_text()
        assert run["run_id"] in page and 'href="../index.html"' in page


def test_report_of_a_real_run_on_a_tiny_model(tiny_llama_dir, data_dir, tmp_path):
    from harness.runner import RunConfig, evaluate

    results = evaluate(RunConfig(model=str(tiny_llama_dir), tasks=["piqa"], limit=3, data_dir=data_dir,
                                 output=tmp_path, batch_size=4))
    store = Store(tmp_path / "store.sqlite")
    sections = build_sections(store, [store.run(results["harness"]["run_id"])])
    board, every = sections[0].tables
    assert every.collapsed and every.header[-1] == "piqa · acc_norm"
    assert len(board.rows) == 1 and board.header[-1] == "piqa" and "n=3" in board.subheader[-1]
    assert board.rows[0][2] == "exact LL"
    report([results["harness"]["run_id"][:10]], all_runs=False, out=tmp_path / "r", store=None, output=tmp_path)
    assert "piqa" in (tmp_path / "r" / "index.md").read_text()


def test_paper_tasks_and_suites_exist_in_the_catalog():
    from harness.catalog import Catalog

    catalog = Catalog()  # also checks that every suite names known tasks
    named = {task for ref in references(load_papers()) for task in ref.tasks}
    assert named and named <= set(catalog.tasks.names())
    assert {"diffugpt-table1", "diffullama-table2"} <= set(catalog.suites.names())
