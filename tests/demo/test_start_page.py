"""The first start: progress arithmetic, the start page, and its switch to the app on the same address."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from demo_constants import DELTAS, MAX_TOKENS

from hf_delta.demo.startup import Stage, StartupProgress, format_seconds


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_percent_and_time_left_follow_the_measured_seconds_per_step():
    clock = _Clock()
    progress = StartupProgress(clock=clock)
    progress.plan(
        [
            Stage("pretrain b", "pretrain", 10, work=2),
            Stage("fine-tune x", "fine-tune", 10, work=1),
            Stage("compress x", "compress", 5, work=4),
        ]
    )
    progress.update("pretrain b", 0, 10)
    first = progress.snapshot()
    assert (first.stage, first.percent, first.eta_s, first.ready) == ("pretrain b", 0.0, None, False)

    clock.now = 4.0
    progress.update("pretrain b", 2, 10)  # 4 s for 2 steps of 2 units: 1 s a unit, used for every kind so far
    snap = progress.snapshot()
    assert snap.eta_s == pytest.approx(8 * 2 + 10 * 1 + 5 * 4)
    assert snap.percent == pytest.approx(100 * 4 / (4 + 46))

    clock.now = 20.0
    progress.update("pretrain b", 10, 10)
    progress.update("fine-tune x", 0, 10)
    clock.now = 25.0
    progress.update("fine-tune x", 10, 10)  # 0.5 s a unit; compress not seen yet: 25 s over 30 units
    snap = progress.snapshot()
    assert snap.stage == "fine-tune x" and snap.elapsed_s == 25.0
    assert snap.eta_s == pytest.approx(5 * 4 * 25 / 30)
    assert snap.percent == pytest.approx(100 * 25 / (25 + 5 * 4 * 25 / 30))

    progress.begin("starting the engine")
    assert progress.snapshot().stage == "starting the engine"
    progress.finish()
    done = progress.snapshot()
    assert (done.stage, done.percent, done.eta_s, done.ready) == ("ready", 100.0, 0.0, True)


def test_the_page_text_says_stage_percent_and_time_left():
    from hf_delta.demo.start_page import render_snapshot
    from hf_delta.demo.startup import Snapshot

    text = render_snapshot(Snapshot("fine-tune llama-arith", 42.4, 125.0, 61.0, False))
    assert "fine-tune llama-arith" in text and 'value="42.4"' in text and "42% done" in text
    assert "2 min 05 s left" in text and "1 min 01 s so far" in text
    assert "estimating" in render_snapshot(Snapshot("pretrain llama-base", 0.0, None, 1.0, False))
    failed = render_snapshot(Snapshot("compress x", 10.0, None, 1.0, False, "ZooError: <bad>"))
    assert "could not start" in failed and "&lt;bad&gt;" in failed
    assert format_seconds(59.6) == "1 min 00 s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_run_demo_serves_the_start_page_at_once_then_the_app_on_the_same_port(demo_models, greedy, monkeypatch):
    from gradio_client import Client

    from hf_delta.demo import DemoSettings
    from hf_delta.demo import launch as launch_module
    from hf_delta.demo.launch import DemoModels
    from hf_delta.demo.start_page import START_PAGE_ID
    from hf_delta.serving.engine import EngineConfig

    base, deltas, examples = demo_models
    release = threading.Event()
    real_start_engine = launch_module.start_engine

    def slow_models(settings, *, progress=None):  # stands in for a first start: a stage that waits for the test
        progress.plan([Stage("fine-tune llama-facts", "fine-tune", 4)])
        progress.update("fine-tune llama-facts", 0, 4)
        progress.update("fine-tune llama-facts", 1, 4)
        release.wait(timeout=120)
        return DemoModels(base=base, deltas=dict(deltas))

    monkeypatch.setattr(launch_module, "resolve_models", slow_models)
    monkeypatch.setattr(
        launch_module,
        "start_engine",
        lambda models, **kw: real_start_engine(models, config=EngineConfig(kv_cache_tokens=4096), **kw),
    )
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    settings = DemoSettings(base=str(base), host="127.0.0.1", port=port, max_tokens=MAX_TOKENS)
    launched = []
    runner = threading.Thread(target=lambda: launched.append(launch_module.run_demo(settings, block=False)))
    runner.start()
    try:
        page = None
        for _ in range(300):
            try:
                page = Client(url, verbose=False)
                break
            except Exception:
                time.sleep(0.2)
        assert page is not None, "the start page did not open"
        status = page.predict(api_name="/progress")
        assert "fine-tune llama-facts" in status and "25% done" in status
        assert START_PAGE_ID in str(page.config)
        release.set()
        runner.join(timeout=180)
        assert launched and launched[0].url == url  # the app took the start page's address
        app = Client(url, verbose=False)
        assert START_PAGE_ID not in str(app.config)
        prompt = examples[DELTAS[0]][0]
        history, _ = app.predict(prompt, [], DELTAS[0], api_name="/chat")
        assert "".join(part["text"] for part in history[-1]["content"]) == greedy(DELTAS[0], prompt)
    finally:
        release.set()
        runner.join(timeout=180)
        for demo in launched:
            demo.close()
