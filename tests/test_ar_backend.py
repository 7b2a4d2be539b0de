"""The AR backend: packed scoring equals plain scoring, batch-size invariance, greedy flags, generation."""
import torch

from harness.models.base import GenerateRequest, InfillRequest, LoglikelihoodRequest, RollingRequest
from harness.models.hf_ar import HFCausalLM
from harness.models.loading import load_causal_lm

REQUESTS = [
    LoglikelihoodRequest("Question: How do I boil an egg?\nAnswer:", " Put it in boiling water."),
    LoglikelihoodRequest("Question: How do I boil an egg?\nAnswer:", " Throw it at the dog."),
    LoglikelihoodRequest("Question: How do I boil an egg?\nAnswer:", " Ten minutes."),
    LoglikelihoodRequest("The quick brown fox", " jumps"),
    LoglikelihoodRequest("Sarah was a much better surgeon than Maria so ", "she always won."),
    LoglikelihoodRequest("def add(a, b):", "\n    return a + b\n"),
]


def backend(path, batch_size=16):
    model, tokenizer = load_causal_lm(str(path))
    return HFCausalLM(model, tokenizer, name="tiny", weights=str(path), batch_size=batch_size)


def plain_loglikelihood(lm, request):
    context, continuation = lm.encode_pair(request)
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.model(ids).logits[0].float(), -1)
    picked = [logprobs[len(context) - 1 + j, t] for j, t in enumerate(continuation)]
    greedy = all(logprobs[len(context) - 1 + j].argmax() == t for j, t in enumerate(continuation))
    return float(sum(picked)), greedy


def test_packed_scoring_equals_plain_forward(tiny_model_dir):
    lm = backend(tiny_model_dir)
    results = lm.loglikelihood(REQUESTS)
    for request, result in zip(REQUESTS, results):
        expected, greedy = plain_loglikelihood(lm, request)
        assert abs(result.logprob - expected) < 1e-4
        assert result.is_greedy == greedy


def test_batch_size_invariance(tiny_model_dir):
    one = backend(tiny_model_dir, batch_size=1).loglikelihood(REQUESTS)
    many = backend(tiny_model_dir, batch_size=16).loglikelihood(REQUESTS)
    assert max(abs(a.logprob - b.logprob) for a, b in zip(one, many)) < 1e-4


def test_trailing_space_moves_to_continuation(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    context, continuation = lm.encode_pair(LoglikelihoodRequest("so ", "she"))
    assert lm.tokenizer.decode(continuation) == " she" and lm.tokenizer.decode(context) == "so"


def test_greedy_continuation_is_flagged(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    context = "The quick brown fox"
    ids = lm.encode(context)
    with torch.no_grad():
        next_id = int(lm.model(torch.tensor([ids])).logits[0, -1].argmax())
    continuation = lm.tokenizer.decode(lm.encode(context) + [next_id])[len(context):]
    if lm.encode_pair(LoglikelihoodRequest(context, continuation))[1] == [next_id]:
        assert lm.loglikelihood([LoglikelihoodRequest(context, continuation)])[0].is_greedy


def test_rolling_loglikelihood_equals_sum_of_token_logprobs(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    text = "The quick brown fox jumps over the lazy dog."
    result = lm.loglikelihood_rolling([RollingRequest(text)])[0]
    ids = lm.encode(text)
    expected = lm.loglikelihood([LoglikelihoodRequest(lm.tokenizer.decode([lm.prefix_token]), text)])[0]
    assert result.n_tokens == len(ids) and result.exact
    assert abs(result.logprob - expected.logprob) < 1e-3


def test_generate_stops_and_counts_tokens(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    out = lm.generate([GenerateRequest("The quick", max_tokens=5)])[0]
    assert 0 < out.n_tokens <= 5 and out.nfe == out.n_tokens
    filled = lm.infill([InfillRequest("def add(a, b):", "\n", n_tokens=4)])[0]
    assert filled.n_tokens == 4 and filled.extra["infill_mode"] == "prefix"


def test_batched_generation_equals_one_at_a_time(tiny_model_dir):
    """Left-padded batches with mixed budgets give each row what decoding it alone gives."""
    prompts = ["The quick", "Question: How do I boil an egg?\nAnswer:", "def add(a, b):", "In my palm is a"]
    generate = [GenerateRequest(p, max_tokens=3 + 2 * i, until=("\n",) if i % 2 else ()) for i, p in enumerate(prompts)]
    infill = [InfillRequest(p, " stone.", n_tokens=2 + i) for i, p in enumerate(prompts)]
    alone, batched = backend(tiny_model_dir, batch_size=1), backend(tiny_model_dir, batch_size=4)
    for method, requests in (("generate", generate), ("infill", infill)):
        one = [getattr(alone, method)([r])[0] for r in requests]
        many = getattr(batched, method)(requests)
        assert [(r.text, r.n_tokens) for r in many] == [(r.text, r.n_tokens) for r in one]
    assert [r.n_tokens for r in batched.infill(infill)] == [2, 3, 4, 5]


def test_segments_are_encoded_alone_and_concatenated(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    request = LoglikelihoodRequest("Question: boil?\nAnswer: ", " put it", segments=(" put", " it"))
    context, continuation = lm.encode_pair(request)
    assert context == lm.encode("Question: boil?\nAnswer: ")
    assert continuation == lm.encode(" put") + lm.encode(" it")
    [scored] = lm.loglikelihood([request])
    expected, _ = plain_loglikelihood(lm, request)
    assert abs(scored.logprob - expected) < 1e-4 and scored.n_tokens == len(continuation)


def test_requests_over_max_input_tokens_are_skipped(tiny_llama_dir):
    lm = backend(tiny_llama_dir)
    short, long = (InfillRequest("def f(x):", "\n", 4, gen_kwargs={"max_input_tokens": budget}) for budget in (50, 5))
    kept, skipped = lm.infill([short, long])
    assert kept.n_tokens == 4 and "skipped" not in kept.extra
    assert skipped.text == "" and skipped.extra["skipped"].endswith("> 5")
