"""The reference OpenAI-compatible server (``harness.serving.reference_server``) over a tiny Llama,
spoken to with the standard library's ``http.client`` on a loopback port."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from serving_local import running_server, tiny_chat_model  # noqa: E402

from harness.serving.reference_server import ServerOptions  # noqa: E402

PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def tiny(one_torch_thread):
    return tiny_chat_model()


@pytest.fixture(scope="module")
def url(tiny):
    with running_server(*tiny) as base:
        yield base


def connect(base: str, timeout: float = 30.0) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(base)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path[:-len("/v1")]


def call(base: str, path: str, body: dict | bytes | None = None, timeout: float = 30.0) -> tuple[int, dict | None]:
    """GET (no body) or POST ``path`` under the server's root; (status, JSON answer)."""
    conn, root = connect(base, timeout)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request("GET" if body is None else "POST", root + path, body=data,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    return response.status, json.loads(raw) if raw else None


def stream(base: str, path: str, body: dict) -> list[tuple[float, dict | str]]:
    """The server-sent events of a streamed POST with their arrival times, up to [DONE]."""
    conn, root = connect(base)
    conn.request("POST", root + path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = []
    for line in iter(response.readline, b""):
        if line.startswith(b"data: "):
            data = line[6:].strip()
            events.append((time.perf_counter(), "[DONE]" if data == b"[DONE]" else json.loads(data)))
    conn.close()
    return events


def complete(base: str, **body) -> dict:
    status, answer = call(base, "/v1/completions", {"model": "tiny", **body})
    assert status == 200, answer
    return answer


def forward_logprobs(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


# ---- completions ----------------------------------------------------------------------------------
def test_greedy_completion_equals_hf_generate(tiny, url):
    import torch

    model, tokenizer = tiny
    ids = tokenizer(PROMPT)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)[0, len(ids):].tolist()
    expected = tokenizer.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for prompt in (PROMPT, ids):
        answer = complete(url, prompt=prompt, max_tokens=12)
        assert answer["object"] == "text_completion" and answer["model"] == "tiny"
        assert answer["choices"][0]["text"] == expected
        assert answer["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(out),
                                   "total_tokens": len(ids) + len(out)}
    both = complete(url, prompt=[ids, "Question:"], max_tokens=12)["choices"]
    assert [c["index"] for c in both] == [0, 1] and both[0]["text"] == expected


def test_echo_logprobs_are_the_models_and_offsets_slice_the_text(tiny, url):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT)["input_ids"]
    expected = forward_logprobs(model, ids)
    choice = complete(url, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"] == PROMPT and len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for i in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][i] - float(expected[i - 1, ids[i]])) < 1e-5
        top = logprobs["top_logprobs"][i]  # keys: tokens decoded alone (several bytes decode to U+FFFD)
        allowed = expected[i - 1].topk(3).values.tolist() + [logprobs["token_logprobs"][i]]
        assert abs(max(top.values()) - allowed[0]) < 1e-5
        assert all(min(abs(v - a) for a in allowed) < 1e-5 for v in top.values())
    generated = complete(url, prompt=PROMPT, max_tokens=8, echo=True, logprobs=1)["choices"][0]
    text, offsets, tokens = generated["text"], generated["logprobs"]["text_offset"], generated["logprobs"]["tokens"]
    assert text.startswith(PROMPT) and len(tokens) == len(ids) + 8 and "".join(tokens) == text
    for i, token in enumerate(tokens):
        assert text[offsets[i]:offsets[i + 1] if i + 1 < len(offsets) else len(text)] == token
    plain = complete(url, prompt=PROMPT, max_tokens=8, logprobs=1)["choices"][0]
    assert plain["text"] == text[len(PROMPT):] and plain["logprobs"]["text_offset"][0] == 0
    assert plain["logprobs"]["token_logprobs"] == generated["logprobs"]["token_logprobs"][len(ids):]


def test_echo_of_a_text_prompt_with_an_added_bos_is_the_prompt(tiny):
    from tokenizers.processors import TemplateProcessing

    from conftest import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                             special_tokens=[("<|endoftext|>", 0)])
    assert tokenizer(PROMPT)["input_ids"][0] == 0
    with running_server(tiny[0], tokenizer) as base:
        choice = complete(base, prompt=PROMPT, max_tokens=0, echo=True, logprobs=0)["choices"][0]
        by_ids = complete(base, prompt=tokenizer(PROMPT)["input_ids"], max_tokens=0, echo=True, logprobs=0)
    assert choice["text"] == PROMPT and choice["logprobs"]["tokens"][0] == ""
    assert choice["logprobs"]["text_offset"][:2] == [0, 0]
    assert by_ids["choices"][0]["text"] == "<|endoftext|>" + PROMPT


def test_prompt_logprobs_in_vllm_format(tiny, url):
    model, tokenizer = tiny
    ids = tokenizer(PROMPT)["input_ids"]
    expected = forward_logprobs(model, ids)
    entries = complete(url, prompt=ids, max_tokens=1, prompt_logprobs=2)["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        row, actual = expected[i - 1], entries[i][str(ids[i])]
        assert abs(actual["logprob"] - float(row[ids[i]])) < 1e-5
        assert actual["rank"] == int((row > row[ids[i]]).sum()) + 1
        assert actual["decoded_token"] == tokenizer.decode([ids[i]])
        for rank, token in enumerate(row.topk(2).indices.tolist(), start=1):
            assert entries[i][str(token)]["rank"] == rank


def test_stream_deltas_concatenate_to_the_completion(url):
    whole = complete(url, prompt=PROMPT, max_tokens=20)
    text = whole["choices"][0]["text"]
    events = stream(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 20,
                                             "stream_options": {"include_usage": True}})
    assert events[-1][1] == "[DONE]" and events[-2][1]["choices"] == [] and events[-2][1]["usage"] == whole["usage"]
    chunks = [event for _, event in events[:-2]]
    assert len(chunks) == 20 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "length"]
    stop = text[6:9]
    cut = complete(url, prompt=PROMPT, max_tokens=20, stop=[stop, "never-there"])["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    events = stream(url, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 20, "stop": stop})
    assert "".join(e["choices"][0]["text"] for _, e in events[:-1]) == cut["text"]
    assert events[-2][1]["choices"][0]["finish_reason"] == "stop"


def test_sampling_is_seeded(url):
    texts = [complete(url, prompt=PROMPT, max_tokens=10, temperature=1.0, top_p=0.9, seed=seed)["choices"][0]["text"]
             for seed in (7, 7, 8)]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_min_tokens_and_ignore_eos(tiny):
    import torch

    model, tokenizer = tiny
    push = torch.zeros(len(tokenizer))
    push[tokenizer.eos_token_id] = 50.0  # EOS always wins
    hook = model.lm_head.register_forward_hook(lambda module, args, output: output + push)
    try:
        with running_server(model, tokenizer) as base:
            first = complete(base, prompt=PROMPT, max_tokens=6)
            late = complete(base, prompt=PROMPT, max_tokens=6, min_tokens=3)
            ignored = complete(base, prompt=PROMPT, max_tokens=5, ignore_eos=True)
    finally:
        hook.remove()
    assert first["choices"][0]["finish_reason"] == "stop" and first["usage"]["completion_tokens"] == 1
    assert first["choices"][0]["text"] == ""
    assert late["choices"][0]["finish_reason"] == "stop" and late["usage"]["completion_tokens"] == 4
    assert "<|endoftext|>" not in late["choices"][0]["text"]
    assert ignored["choices"][0] == {**ignored["choices"][0], "finish_reason": "length", "text": ""}
    assert ignored["usage"]["completion_tokens"] == 5


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_equals_a_completion_of_the_rendered_template(tiny, url):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do I boil an egg?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    status, chat = call(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_tokens": 10})
    plain = complete(url, prompt=ids, max_tokens=10)
    assert status == 200 and chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": plain["choices"][0]["text"]}
    assert chat["usage"] == plain["usage"] and chat["choices"][0]["finish_reason"] == "length"
    events = stream(url, "/v1/chat/completions", {"model": "tiny", "messages": messages, "max_completion_tokens": 10})
    chunks = [e for _, e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_tokenizer_without_chat_template_is_refused(tiny):
    from conftest import build_tokenizer

    with running_server(tiny[0], build_tokenizer()) as base:
        status, answer = call(base, "/v1/chat/completions",
                              {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "no chat template" in answer["error"]["message"]


# ---- what the server says, and what it refuses ------------------------------------------------------
def test_info_routes(tiny, url):
    _, tokenizer = tiny
    assert call(url, "/health")[0] == 200
    assert call(url, "/version")[1]["engine"] == "harness-reference"
    models = call(url, "/v1/models")[1]
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 512
    info = call(url, "/server_info")[1]
    assert info["model"] == "tiny" and info["dtype"] == "float32" and "cpu" in info["hardware"]
    tokens = call(url, "/tokenize", {"prompt": PROMPT})[1]
    assert tokens == {"tokens": tokenizer(PROMPT)["input_ids"], "count": len(tokens["tokens"]), "max_model_len": 512}


@pytest.mark.parametrize("body, status, words", [
    ({"model": "other", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n must be 1"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "0 only with echo"),
    ({"model": "tiny", "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": [[1, 2], [3]], "stream": True}, 400, "one prompt"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "token ids"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 600}, 400, "maximum context length"),
    (b"{not json", 400, "not valid JSON"),
])
def test_bad_requests_get_openai_errors(url, body, status, words):
    got, answer = call(url, "/v1/completions", body)
    assert got == status and words in answer["error"]["message"] and answer["error"]["code"] == status


def test_echo_and_prompt_logprobs_can_be_refused(tiny):
    with running_server(*tiny, options=ServerOptions(echo_logprobs=False, prompt_logprobs=False)) as base:
        echo = call(base, "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True, "max_tokens": 1})
        prompt = call(base, "/v1/completions", {"model": "tiny", "prompt": "x", "prompt_logprobs": 1})
    assert echo[0] == 400 and "echo is not supported" in echo[1]["error"]["message"]
    assert prompt[0] == 400


# ---- injected faults and timing -------------------------------------------------------------------
def test_fail_first_then_answers(tiny):
    with running_server(*tiny, options=ServerOptions(fail_first=2)) as base:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
        statuses = [call(base, "/v1/completions", body)[0] for _ in range(3)]
        assert statuses == [500, 500, 200] and base.app.state.requests_seen == 3


def test_close_first_breaks_the_response(tiny):
    with running_server(*tiny, options=ServerOptions(close_first=2)) as base:
        conn, root = connect(base)
        conn.request("POST", root + "/v1/completions", body=json.dumps({"model": "tiny", "prompt": "x"}))
        with pytest.raises((http.client.IncompleteRead, http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse().read()
        events = stream(base, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 4})
        assert events and "[DONE]" not in [e for _, e in events]
        assert complete(base, prompt="x", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_hang_first_times_out_the_client_and_the_server_still_stops(tiny):
    server = running_server(*tiny, options=ServerOptions(hang_first=1))
    base = server.__enter__()
    try:
        with pytest.raises((socket.timeout, TimeoutError)):
            call(base, "/v1/completions", {"model": "tiny", "prompt": "x"}, timeout=0.5)
        assert complete(base, prompt="x", max_tokens=2)["usage"]["completion_tokens"] == 2
    finally:
        start = time.monotonic()
        server.__exit__(None, None, None)
    assert time.monotonic() - start < 6


def test_token_delay_spaces_the_stream_and_overlaps_requests(tiny):
    with running_server(*tiny, options=ServerOptions(token_delay_s=0.05)) as base:
        events = stream(base, "/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
        times = [t for t, event in events if event != "[DONE]"]
        assert len(times) == 4 and min(b - a for a, b in zip(times, times[1:])) >= 0.045
        start = time.perf_counter()
        threads = [threading.Thread(target=complete, args=(base,), kwargs={"prompt": PROMPT, "max_tokens": 8})
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.perf_counter() - start < 0.75  # one after the other: at least 0.8 s
