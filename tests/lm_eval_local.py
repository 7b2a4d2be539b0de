"""A tiny local multiple-choice task for lm-eval (its YAML over a jsonl file), shared by the bridge tests."""
import json
from pathlib import Path

DOCS = [{"question": "How do I boil an egg?", "choices": ["Put it in boiling water.", "Throw it."], "label": 0},
        {"question": "What is two plus two?", "choices": ["Four.", "Five."], "label": 0},
        {"question": "Where do fish live?", "choices": ["In trees.", "In water."], "label": 1}]


def write_local_mc(folder: Path, data: Path) -> Path:
    """Write DOCS to ``data`` and lm-eval's task ``local_mc`` over it into ``folder``; returns the YAML."""
    data.write_text("\n".join(json.dumps(d) for d in DOCS))
    path = folder / "local_mc.yaml"
    path.write_text(f"""task: local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return path
