"""Every OpenAI request parameter is honoured (checked against ``DeltaModel`` through ``sampling_reference``) or
refused with a 400 naming it; bodies over the limit get 413 unread; no error body names a server path."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from http_helpers import request_json
from sampling_reference import greedy, prompt_logprobs, reference_model

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from hf_delta.serving import Engine, EngineConfig, ServerThread, create_app  # noqa: E402

DELTA = "cipher-x6"
MAX = 5
LIMIT = 64 * 1024  # this server's body limit


@pytest.fixture(scope="module")
def tokenizer(micro_base):
    from hf_delta.utils.loading import load_tokenizer

    return load_tokenizer(micro_base)


@pytest.fixture(scope="module")
def model(micro_base, serving_deltas):
    return reference_model(micro_base, {DELTA: serving_deltas[DELTA]})


@pytest.fixture(scope="module")
def eos(tokenizer) -> frozenset[int]:
    return frozenset({tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def fine_tuning_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server-private-ft")


@pytest.fixture(scope="module")
def server(micro_base, serving_deltas, broken_delta, fine_tuning_dir):
    config = EngineConfig(device_slots=2, cpu_slots=2, kv_cache_tokens=2048, block_size=8, max_running=32)
    engine = Engine(micro_base, deltas={DELTA: serving_deltas[DELTA], "broken": broken_delta}, config=config)
    with ServerThread(create_app(engine, fine_tuning_dir=fine_tuning_dir, max_body_bytes=LIMIT)) as srv:
        yield srv
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt(serving_prompts) -> str:
    return serving_prompts(DELTA.split("-")[0] + "-x6", 1)[0]


def _both(fn):
    """``fn(model)`` for the delta and the base at the same time (their requests share engine steps)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(fn, [DELTA, "base"]))


def _ref_name(model: str) -> str:
    return "__base__" if model == "base" else model


def test_completion_logprobs_equal_the_reference_streamed_or_not(client, model, tokenizer, eos, prompt):
    ids = tokenizer(prompt)["input_ids"]
    outs = _both(lambda m: client.completions.create(model=m, prompt=prompt, max_tokens=MAX, temperature=0,
                                                     logprobs=3))
    for name, out in zip((DELTA, "base"), outs, strict=True):
        want = greedy(model, _ref_name(name), ids, MAX, eos, top=3)
        lp = out.choices[0].logprobs
        assert lp.tokens == [tokenizer.decode([t]) for t in want.tokens]
        torch.testing.assert_close(lp.token_logprobs, want.logprobs, rtol=0, atol=1e-4)
        for got, top in zip(lp.top_logprobs, want.top, strict=True):
            assert list(got) == [tokenizer.decode([t]) for t, _ in top]
            torch.testing.assert_close(list(got.values()), [v for _, v in top], rtol=0, atol=1e-4)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        streamed = list(client.completions.create(model=name, prompt=prompt, max_tokens=MAX, temperature=0,
                                                  logprobs=3, stream=True))
        joined = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
        assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
        # The same numbers chunk by chunk (up to float rounding: the stream ran in other batches than the answer).
        torch.testing.assert_close(joined, lp.token_logprobs, rtol=0, atol=1e-5)


def test_echo_scores_the_prompt_as_lm_eval_asks(server, model, tokenizer, prompt):
    """lm-eval's ``local-completions``: token-id prompts, ``echo=True, logprobs=1, max_tokens=0``."""
    ids = tokenizer(prompt)["input_ids"]
    body = {"prompt": [ids, ids[:-3]], "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0, "seed": 1}
    answers = _both(lambda m: request_json(server.url + "/v1/completions", body=json.dumps({**body, "model": m})
                                           .encode()))
    for name, (status, out) in zip((DELTA, "base"), answers, strict=True):
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == 0
        for choice, prompt_ids in zip(out["choices"], [ids, ids[:-3]], strict=True):
            want = prompt_logprobs(model, _ref_name(name), prompt_ids, top=1)
            lp = choice["logprobs"]
            assert choice["text"] == tokenizer.decode(prompt_ids) and choice["finish_reason"] == "length"
            assert lp["tokens"] == [tokenizer.decode([t]) for t in prompt_ids]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            torch.testing.assert_close(lp["token_logprobs"][1:], want.logprobs, rtol=0, atol=1e-4)
            assert [list(t) for t in lp["top_logprobs"][1:]] == [[tokenizer.decode([t]) for t, _ in top]
                                                                 for top in want.top]


def test_echo_with_a_completion_streams_the_same(client, tokenizer, prompt):
    out = client.completions.create(model=DELTA, prompt=prompt, echo=True, logprobs=2, max_tokens=3, temperature=0)
    choice = out.choices[0]
    plain = client.completions.create(model=DELTA, prompt=prompt, max_tokens=3, temperature=0).choices[0].text
    assert choice.text == prompt + plain
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert len(choice.logprobs.tokens) == n_prompt + out.usage.completion_tokens
    chunks = list(client.completions.create(model=DELTA, prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed[0] is None and choice.logprobs.token_logprobs[0] is None
    torch.testing.assert_close(streamed[1:], choice.logprobs.token_logprobs[1:], rtol=0, atol=1e-5)


def test_chat_logprobs_and_top_logprobs(client, model, tokenizer, eos):
    messages = [{"role": "user", "content": "first: ka lo mi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    outs = _both(lambda m: client.chat.completions.create(model=m, messages=messages, max_tokens=MAX, temperature=0,
                                                          logprobs=True, top_logprobs=2))
    for name, out in zip((DELTA, "base"), outs, strict=True):
        want = greedy(model, _ref_name(name), ids, MAX, eos, top=2)
        content = out.choices[0].logprobs.content
        assert [item.token for item in content] == [tokenizer.decode([t]) for t in want.tokens]
        assert [item.bytes for item in content] == [list(tokenizer.decode([t]).encode()) for t in want.tokens]
        torch.testing.assert_close([item.logprob for item in content], want.logprobs, rtol=0, atol=1e-4)
        for item, top in zip(content, want.top, strict=True):
            assert [t.token for t in item.top_logprobs] == [tokenizer.decode([t]) for t, _ in top]
            torch.testing.assert_close([t.logprob for t in item.top_logprobs], [v for _, v in top], rtol=0, atol=1e-4)
    streamed = [item for c in client.chat.completions.create(model=DELTA, messages=messages, max_tokens=MAX,
                                                             temperature=0, logprobs=True, top_logprobs=2,
                                                             stream=True)
                if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    whole = outs[0].choices[0].logprobs.content
    assert [i.token for i in streamed] == [i.token for i in whole]
    torch.testing.assert_close([i.logprob for i in streamed], [i.logprob for i in whole], rtol=0, atol=1e-5)
    plain = client.chat.completions.create(model=DELTA, messages=messages, max_tokens=MAX, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_logit_bias_and_min_tokens_equal_the_reference(server, model, tokenizer, eos, prompt):
    ids = tokenizer(prompt)["input_ids"]
    end = min(eos)
    cases = [{"frequency_penalty": 1.2, "presence_penalty": 0.7},
             {"repetition_penalty": 1.8},
             {"logit_bias": {"224": -100, "17": 4}},
             {"min_tokens": 2, "logit_bias": {str(end): 100}}]
    for case in cases:
        body = {"prompt": prompt, "max_tokens": MAX, "temperature": 0, **case}
        answers = _both(lambda m, body=body: request_json(server.url + "/v1/completions",
                                                          body=json.dumps({**body, "model": m}).encode()))
        for name, (status, out) in zip((DELTA, "base"), answers, strict=True):
            assert status == 200, out
            bias = {int(t): float(b) for t, b in case.get("logit_bias", {}).items()}
            want = greedy(model, _ref_name(name), ids, MAX, eos, **{**case, "logit_bias": bias})
            assert out["choices"][0]["text"] == tokenizer.decode(want.tokens), (case, name)
            assert out["usage"]["completion_tokens"] == len(want.tokens) + (want.finish == "stop")  # EOS counts
            plain = greedy(model, _ref_name(name), ids, MAX, eos)
            assert want.tokens != plain.tokens or name == "base", case  # the parameter changed the delta's output


def test_n_choices(client, prompt, tokenizer):
    greedy_out = client.completions.create(model=DELTA, prompt=[prompt, prompt + " 1"], max_tokens=MAX,
                                           temperature=0, n=2)
    texts = [c.text for c in greedy_out.choices]
    assert [c.index for c in greedy_out.choices] == [0, 1, 2, 3]  # prompt-major, as OpenAI orders them
    assert texts[0] == texts[1] and texts[2] == texts[3]
    single = client.completions.create(model=DELTA, prompt=prompt, max_tokens=MAX, temperature=0).choices[0].text
    assert texts[0] == single
    n_prompt = len(tokenizer(prompt)["input_ids"]) + len(tokenizer(prompt + " 1")["input_ids"])
    assert greedy_out.usage.prompt_tokens == n_prompt  # a prompt counts once, not once per choice
    sampled = client.chat.completions.create(model=DELTA, messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=MAX, temperature=1.5, seed=11, n=3)
    contents = [c.message.content for c in sampled.choices]
    assert len(set(contents)) > 1  # each choice draws its own sample
    for i, content in enumerate(contents):  # choice i is the request seeded seed + i
        alone = client.chat.completions.create(model=DELTA, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=MAX, temperature=1.5, seed=11 + i)
        assert alone.choices[0].message.content == content
    streamed = list(client.chat.completions.create(model=DELTA, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=MAX, temperature=1.5, seed=11, n=3, stream=True))
    for i, content in enumerate(contents):
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == i) == content


def test_response_format_text_is_honoured_and_json_refused(client, prompt):
    plain = client.completions.create(model=DELTA, prompt=prompt, max_tokens=MAX, temperature=0).choices[0].text
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=DELTA, messages=messages, max_tokens=MAX, temperature=0,
                                          response_format={"type": "text"})
    assert chat.choices[0].message.content == client.chat.completions.create(
        model=DELTA, messages=messages, max_tokens=MAX, temperature=0).choices[0].message.content
    assert client.completions.create(model=DELTA, prompt=prompt, max_tokens=MAX, temperature=0,
                                     extra_body={"response_format": {"type": "text"}}).choices[0].text == plain
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.chat.completions.create(model=DELTA, messages=messages, max_tokens=MAX, response_format=fmt)


@pytest.mark.parametrize(("route", "field", "value"), [
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat", "tool_choice", "auto"),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "reasoning_effort", "high"),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "store", True),
    ("chat", "web_search_options", {}),
    ("completions", "suffix", " end"),
    ("completions", "best_of", 3),
    ("chat", "top_logprobs", 2),  # without logprobs=true
    ("chat", "min_p", 0.1),  # a vLLM extension this server does not implement: unknown
    ("completions", "use_beam_search", True),
    ("chat", "echo", True),  # a completions parameter sent to chat
])
def test_refused_parameters_get_a_400_naming_them(server, route, field, value):
    path, base = (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) if route == "chat"
                  else ("/v1/completions", {"prompt": "hi"}))
    status, out = request_json(server.url + path, body=json.dumps(
        {"model": DELTA, "max_tokens": 2, **base, field: value}).encode())
    assert status == 400, out
    assert field in out["error"]["message"]


def test_neutral_values_of_refused_parameters_are_accepted(server):
    body = {"model": DELTA, "max_tokens": 2, "messages": [{"role": "user", "content": "hi", "name": "ann"}],
            "tool_choice": "none", "store": False, "modalities": ["text"], "parallel_tool_calls": True,
            "user": "u-1", "logprobs": False}
    status, out = request_json(server.url + "/v1/chat/completions", body=json.dumps(body).encode())
    assert status == 200, out
    status, out = request_json(server.url + "/v1/chat/completions", body=json.dumps(
        {**body, "messages": [{"role": "user", "content": "hi", "colour": "red"}]}).encode())
    assert status == 400 and "messages.0.colour" in out["error"]["message"]


def test_a_body_over_the_limit_gets_413_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    # Content-Length says 50 MB but only a few bytes follow: the answer comes without the body being read.
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    start = time.monotonic()
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50 * 2**20))
    conn.endheaders(b'{"model": "')
    response = conn.getresponse()
    assert response.status == 413 and time.monotonic() - start < 5
    assert str(LIMIT) in json.loads(response.read())["error"]["message"]
    conn.close()
    # Without a Content-Length (chunked), the body is counted as it arrives.
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    pieces = iter([b'{"model": "x", "prompt": "'] + [b"a" * 8192] * (2 * LIMIT // 8192) + [b'"}'])
    conn.request("POST", "/v1/completions", body=pieces, headers={"Content-Type": "application/json"},
                 encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413, response.read()
    conn.close()
    ok, _ = request_json(server.url + "/v1/completions", body=json.dumps(
        {"model": DELTA, "prompt": "hi", "max_tokens": 1}).encode())
    assert ok == 200  # a body under the limit is served


def test_no_error_body_names_a_server_path(server, fine_tuning_dir, broken_delta):
    private = [str(fine_tuning_dir), str(broken_delta), str(fine_tuning_dir.parent)]
    bodies = []
    for payload in ({"model": "base", "training_file": "../outside.jsonl"},
                    {"model": "base", "training_file": "missing.jsonl"},
                    {"model": "base", "training_data": [{"text": "x"}], "output_dir": "/etc"}):
        bodies.append(request_json(server.url + "/v1/fine_tuning/jobs", body=json.dumps(payload).encode()))
    bodies.append(request_json(server.url + "/v1/completions", body=json.dumps(
        {"model": "broken", "prompt": "hi", "max_tokens": 2}).encode()))
    for status, body in bodies:
        assert status >= 400, body
        message = body["error"]["message"]
        assert not any(p in message for p in private), message
    assert "delta_model.safetensors" in bodies[-1][1]["error"]["message"]  # the file is still named


def test_lm_eval_local_completions_log_likelihoods(server, micro_base, model, tokenizer):
    """lm-eval's own ``local-completions`` client (``lm_eval[api]``) against this server equals the reference."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    pairs = [("add 1 to 2 3 =", " 3 4"), ("encode a b =", " c d")]
    for name in (DELTA, "base"):
        lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=name, tokenizer_backend="huggingface",
                                 tokenizer=str(micro_base), num_concurrent=1, max_retries=1, batch_size=2)
        got = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                                for i, pair in enumerate(pairs)])
        for (context, continuation), (logprob, _) in zip(pairs, got, strict=True):
            ids, start = tokenizer(context + continuation)["input_ids"], len(tokenizer(context)["input_ids"])
            want = prompt_logprobs(model, _ref_name(name), ids).logprobs[start - 1 :]
            assert logprob == pytest.approx(sum(want), abs=1e-4), (name, context)
