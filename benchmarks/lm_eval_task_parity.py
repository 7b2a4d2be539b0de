"""A stored harness run against lm-eval's own tasks of the same names, document by document.

For each task of the run that lm-eval also has on the local data (``harness lm-eval-tasks``), lm-eval
builds its requests for the same documents; the script compares each prompt, stop list and budget
with the harness's, then scores the harness model's stored answers with lm-eval's filters and
metrics and compares every per-document value with the harness's.

    python benchmarks/lm_eval_task_parity.py --run runs/RUN_ID --data-dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def lm_eval_instances(task, limit: int) -> list:
    """lm-eval's instances as its evaluator builds them (fewshot seed 1234, rank 0 of 1), by document."""
    if task.get_config("num_fewshot") is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return sorted(task.instances, key=lambda inst: inst.doc_id)


def compare(task, samples: list[dict]) -> dict[str, int]:
    """Counts of documents whose prompt, stops, budget and every metric agree."""
    from harness.lm_eval_import import metric_name

    instances = lm_eval_instances(task, len(samples))
    for inst, sample in zip(instances, samples):
        inst.resps = [sample["resps"][0]["text"]]
    task.apply_filters()
    counts = {"documents": len(samples), "prompt": 0, "until": 0, "budget": 0, "scores": 0}
    for inst, sample in zip(instances, samples):
        request = sample["arguments"][0]
        context, gen_kwargs = inst.args
        counts["prompt"] += context == request["context"]
        counts["until"] += list(gen_kwargs["until"]) == list(request["until"])
        counts["budget"] += gen_kwargs.get("max_gen_toks", 256) == request["max_tokens"]
        filters = set(inst.filtered_resps)
        theirs = {metric_name(metric, key, filters): value for key in inst.filtered_resps
                  for metric, value in task.process_results(inst.doc, [inst.filtered_resps[key]]).items()}
        ours = {key: sample[key] for key in theirs if key in sample}
        counts["scores"] += ours == theirs and len(ours) == len(theirs)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="A run folder (results.json, samples_*.jsonl).")
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    from lm_eval.tasks import TaskManager

    from harness.lm_eval_tasks import task_folder

    folder = task_folder(args.data_dir)
    names = [p.name for p in folder.iterdir() if (args.run / f"samples_{p.name}.jsonl").exists()]
    tasks = TaskManager(include_path=str(folder)).load(names)["tasks"]
    for name in names:
        samples = [json.loads(line) for line in (args.run / f"samples_{name}.jsonl").read_text().splitlines()]
        samples.sort(key=lambda s: s["doc_id"])
        counts = compare(tasks[name], samples)
        print(f"{name}: " + ", ".join(f"{k} {v}" if k == "documents" else f"{k} {v}/{counts['documents']}"
                                      for k, v in counts.items()))


if __name__ == "__main__":
    main()
