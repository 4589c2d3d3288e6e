"""The app launched headlessly and driven with gradio_client: chat turns, a compare batch, the models panel,
and bad input (clear errors, and the app keeps serving)."""

from __future__ import annotations

import pytest
from demo_constants import DELTAS, MAX_TOKENS
from gradio_client.exceptions import ValidationError


def _reply(history: list[dict]) -> str:
    last = history[-1]
    assert last["role"] == "assistant"
    return "".join(part["text"] for part in last["content"])


@pytest.mark.parametrize("name", DELTAS)
def test_chat_turn_returns_the_finetunes_greedy_answer(client, running_demo, greedy, name):
    prompt = running_demo.examples[name][0]
    history, box = client.predict(prompt, [], name, api_name="/chat")
    assert box == ""  # the textbox is cleared
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert _reply(history) == greedy(name, prompt)


def test_finetunes_answer_differently(greedy, running_demo):
    # Guards the test above: the fine-tunes are distinguishable on these prompts, so a mixed-up route would fail.
    prompt = running_demo.examples["llama-facts"][0]
    assert len({greedy(name, prompt) for name in DELTAS}) > 1


def test_chat_keeps_history_for_the_chat_template(client, running_demo, greedy):
    first, second = running_demo.examples["llama-chat"][:2]
    history, _ = client.predict(first, [], "llama-chat", api_name="/chat")
    history, _ = client.predict(second, history, "llama-chat", api_name="/chat")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert "".join(p["text"] for p in history[2]["content"]) == second


def test_compare_answers_every_model_from_one_batch(client, running_demo, greedy):
    prompt = running_demo.examples["llama-arith"][0]
    summary, cards, result = client.predict(prompt, list(DELTAS), api_name="/compare")
    answers = result["answers"]
    assert [a["model"] for a in answers] == list(DELTAS)
    for a in answers:
        assert a["error"] is None
        assert a["text"] == greedy(a["model"], prompt)
        assert a["latency_s"] > 0 and a["ttft_s"] is not None
        assert a["model"] in cards
    assert result["one_batch"], result  # all four were decoding together, sharing the forward passes
    assert result["engine_steps"] <= MAX_TOKENS + 1  # decoded together, not one after another (4 x 8 steps)
    assert "one mixed batch" in summary


def test_models_panel(client):
    table, summary, chart = client.predict(api_name="/models")
    rows = {r[0]: dict(zip(table["headers"], r, strict=True)) for r in table["data"]}
    assert list(rows) == ["base", *DELTAS]
    for name in DELTAS:
        assert rows[name]["method"] == "bitdelta"
        assert float(rows[name]["ratio"].rstrip("x")) > 1
        assert rows[name]["residency"] == "resident (attached)"  # warmed up at start
    assert rows["llama-chat"]["prompt"] == "chat" and rows["llama-arith"]["prompt"] == "raw"
    parts = {part: mb for part, mb in chart["data"]}
    assert list(parts) == ["base weights", "deltas (attached)", "deltas (CPU memory)"]
    assert parts["base weights"] > parts["deltas (attached)"] > 0
    assert f"{len(DELTAS)} deltas attached" in summary


@pytest.mark.parametrize(
    ("args", "api", "message"),
    [
        (("", [], "llama-arith"), "/chat", "message is empty"),
        (("   ", [], "llama-chat"), "/chat", "message is empty"),
        (("hello", [], "no-such-model"), "/chat", "'no-such-model' does not exist; served models"),
        (("add 1 to " + "1 2 3 4 " * 80 + "=", [], "llama-arith"), "/chat", "maximum context length"),
        (("add 1 to 2 =", []), "/compare", "at least one model"),
        (("add 1 to 2 =", ["llama-arith", "nope"]), "/compare", "'nope' does not exist"),
        (("", ["llama-arith"]), "/compare", "prompt is empty"),
        (("w " * 400, ["llama-arith", "llama-chat"]), "/compare", "maximum context length"),
    ],
    ids=["empty", "blank", "unknown-model", "too-long", "no-models", "compare-unknown", "compare-empty",
         "compare-too-long"],
)
def test_bad_input_gives_a_clear_error_and_the_app_keeps_serving(client, running_demo, greedy, args, api, message):
    with pytest.raises(ValidationError, match=message):
        client.predict(*args, api_name=api)
    prompt = running_demo.examples["llama-facts"][0]
    history, _ = client.predict(prompt, [], "llama-facts", api_name="/chat")
    assert _reply(history) == greedy("llama-facts", prompt)


def test_stop_aborts_the_sessions_stream(running_demo):
    from hf_delta.demo.service import DemoService

    engine = running_demo.engine
    service = DemoService(engine, max_tokens=200)
    generated = engine.counters["generated"]
    stream = service.stream_reply("base", "The", session="s1")
    next(stream)
    assert service.stop("s1") == 1
    for _ in stream:
        pass
    assert engine.counters["generated"] - generated < 200
    assert service.stop("s1") == 0


def test_stop_endpoint(client):
    assert client.predict(api_name="/stop") in (None, ())


def test_long_conversations_drop_their_oldest_turns(running_demo):
    from hf_delta.demo.service import DemoService

    service = DemoService(running_demo.engine, max_tokens=MAX_TOKENS)
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"turn {i}: " + "belz " * 6},
                    {"role": "assistant", "content": [{"type": "text", "text": "ok " * 4}]}]
    prompt, ids = service.build_prompt("llama-chat", "last: a b c", history)
    assert len(ids) + MAX_TOKENS <= running_demo.engine.max_model_len
    assert "turn 29:" in prompt and "turn 0:" not in prompt and prompt.count("last: a b c") == 1
