"""The OpenAI-compatible server, driven by the official ``openai`` client over 127.0.0.1."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from http_helpers import request_json

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from hf_delta.serving import Engine, EngineConfig, ServerThread, create_app  # noqa: E402

KEY = "test-key"
MAX = 8


@pytest.fixture(scope="module")
def server(micro_base, serving_deltas, broken_delta):
    config = EngineConfig(device_slots=4, cpu_slots=4, kv_cache_tokens=2048, block_size=8, max_running=64)
    engine = Engine(micro_base, deltas={**serving_deltas, "broken": broken_delta}, config=config)
    with ServerThread(create_app(engine, api_key=KEY)) as srv:
        srv.engine = engine
        yield srv
    engine.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _post(server, path: str, body: bytes, key: str | None = KEY) -> tuple[int, dict]:
    return request_json(server.url + path, method="POST", body=body, key=key)


def test_models_and_health(server, client, serving_deltas):
    assert [m.id for m in client.models.list()] == ["base", *serving_deltas, "broken"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        assert json.loads(resp.read())["status"] == "ok"  # no key needed for /health


def test_completion_and_chat_use_each_deltas_own_template(client, serving_deltas, serving_prompts, reference):
    from hf_delta.utils.loading import load_tokenizer

    prompt = serving_prompts("arith-x10", 1)[0]
    out = client.completions.create(model="arith-x10", prompt=prompt, max_tokens=MAX, temperature=0)
    assert out.choices[0].text == reference("arith-x10", prompt, MAX)
    assert out.usage.completion_tokens >= 1
    # The chat fine-tune has its own tokens, template and end-of-turn token; the server renders with them.
    messages = [{"role": "user", "content": "first: ka lo mi"}]
    chat = client.chat.completions.create(model="chat-x6", messages=messages, max_tokens=MAX, temperature=0)
    tokenizer = load_tokenizer(serving_deltas["chat-x6"])
    assert "<|user|>" in (rendered := tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=False))
    assert chat.choices[0].message.content == reference("chat-x6", rendered, MAX)
    assert chat.choices[0].finish_reason in ("stop", "length")


def test_64_streaming_clients_over_16_deltas_with_4_slots(server, client, serving_deltas, serving_prompts,
                                                          reference):
    jobs = [(name, p) for name in serving_deltas for p in serving_prompts(name, 4)]
    assert len(jobs) == 64

    def stream(job):
        name, prompt = job
        text, finish = "", None
        for chunk in client.completions.create(model=name, prompt=prompt, max_tokens=MAX, temperature=0,
                                               stream=True):
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    with ThreadPoolExecutor(64) as pool:
        outputs = list(pool.map(stream, jobs))
    for (name, prompt), (text, finish) in zip(jobs, outputs, strict=True):
        assert text == reference(name, prompt, MAX), name
        assert finish in ("stop", "length")
    stats = client.get("/stats", cast_to=object)
    residency, memory = stats["residency"], stats["memory"]
    assert residency["peak_device"] <= 4 and residency["peak_cpu"] <= 4
    assert residency["attaches"] >= 16  # every delta went through the 4 slots
    biggest = max(sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in serving_deltas.values())
    weights = memory["weight_bytes"]
    assert weights["deltas_device"] + weights["deltas_cpu"] <= 8 * biggest * 1.1  # at most 4 + 4 deltas held
    assert memory["kv_peak_tokens"] <= memory["kv_cache_tokens"]


def test_chat_streaming(client):
    chunks = list(client.chat.completions.create(
        model="chat-x1", messages=[{"role": "user", "content": "last: ka lo mi"}], max_tokens=MAX, temperature=0.8,
        seed=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_bad_input_gets_clear_errors(server, client):
    with pytest.raises(openai.NotFoundError, match="arith-x1"):  # the message lists the served models
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="arith-x1", prompt="hi", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="arith-x1", prompt="hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 64\]"):
        client.completions.create(model="arith-x1", prompt="hi", max_tokens=2, n=65)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="arith-x1", prompt="", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    status, body = _post(server, "/v1/completions", b'{"model": "arith-x1", "prompt": ')
    assert status == 422 and "JSON" in body["error"]["message"]
    status, body = _post(server, "/v1/completions", b'{"model": "arith-x1", "prompt": "x", "max_tokens": "many"}')
    assert status == 422 and "max_tokens" in body["error"]["message"]
    status, body = _post(server, "/v1/chat/completions", b'{"model": "chat-x1", "messages": []}')
    assert status == 422
    status, _ = _post(server, "/v1/completions", b'{"model": "arith-x1", "prompt": "x"}', key=None)
    assert status == 401


def test_broken_delta_fails_only_its_own_requests(server, client, serving_prompts, reference):
    prompt = serving_prompts("cipher-x3", 1)[0]

    def good():
        return client.completions.create(model="cipher-x3", prompt=prompt, max_tokens=MAX, temperature=0)

    def bad(stream: bool):
        try:
            if stream:
                list(client.completions.create(model="broken", prompt=prompt, max_tokens=MAX, stream=True))
            else:
                client.completions.create(model="broken", prompt=prompt, max_tokens=MAX)
        except openai.APIStatusError as err:
            return err
        return None

    with ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good) for _ in range(4)]
        bads = [pool.submit(bad, s) for s in (False, True)]
        for f in goods:
            assert f.result().choices[0].text == reference("cipher-x3", prompt, MAX)
        for f in bads:
            err = f.result()
            assert err is not None and err.status_code == 500
            assert "broken" in err.message and "corrupt" in err.message
    assert server.engine.is_running
    assert good().choices[0].text == reference("cipher-x3", prompt, MAX)  # the server still serves
