"""WikiText-2 perplexity: articles, weighted aggregation, exact (AR) vs bound (DLM) on the same windows."""
import json
import math

import pytest

from harness.runner import RunConfig, evaluate
from harness.scoring.metrics import aggregate
from harness.tasks.perplexity import split_articles


def test_articles_split_at_top_level_headings():
    text = " = A = \n text one \n = = Sub = = \n more \n = B = \n text two \n"
    assert [a.splitlines()[0].strip() for a in split_articles(text)] == ["= A =", "= B ="]


def test_weighted_perplexity_and_bits_per_byte():
    per_example = [{"word_perplexity": [-10.0, 5], "bits_per_byte": [-10.0, 20]},
                   {"word_perplexity": [-20.0, 5], "bits_per_byte": [-20.0, 20]}]
    out = aggregate(per_example, {"word_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_unit"})
    assert out["word_perplexity"] == pytest.approx(math.exp(3.0))
    assert out["bits_per_byte"] == pytest.approx(30 / 40 / math.log(2))


@pytest.mark.parametrize("which", ["ar", "dlm"])
def test_wikitext_runs_on_both_families(which, tiny_llama_dir, tiny_dlm_dir, data_dir, tmp_path):
    model = tiny_llama_dir if which == "ar" else tiny_dlm_dir
    args = {} if which == "ar" else {"samples": 2}
    config = RunConfig(model=str(model), tasks=["wikitext2"], limit=1, data_dir=data_dir, output=tmp_path,
                       model_args=args, task_options={"wikitext2": {"window": 64}})
    results = evaluate(config)
    assert results["results"]["wikitext2"]["word_perplexity,none"] > 1
    line = (tmp_path / results["harness"]["run_id"] / "samples_wikitext2.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["likelihood"] == ("exact" if which == "ar" else "elbo_bound")
