"""The first start: progress arithmetic, the start page, and its switch to the app on the same address."""

from __future__ import annotations

import time

import pytest
from demo_constants import DELTAS

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


@pytest.mark.slow
def test_run_demo_serves_the_start_page_at_once_then_the_app_on_the_same_port(starting_demo, demo_models, greedy):
    from gradio_client import Client

    from hf_delta.demo.start_page import START_PAGE_ID

    page = None
    for _ in range(300):
        try:
            page = Client(starting_demo.url, verbose=False)
            break
        except Exception:
            time.sleep(0.2)
    assert page is not None, "the start page did not open"
    status = page.predict(api_name="/progress")
    assert "fine-tune llama-facts" in status and "25% done" in status
    assert START_PAGE_ID in str(page.config)
    starting_demo.release.set()
    starting_demo.thread.join(timeout=300)
    assert starting_demo.launched and starting_demo.launched[0].url == starting_demo.url  # same address
    app = Client(starting_demo.url, verbose=False)
    assert START_PAGE_ID not in str(app.config)
    prompt = demo_models[2][DELTAS[0]][0]
    history, _ = app.predict(prompt, [], DELTAS[0], api_name="/chat")
    assert "".join(part["text"] for part in history[-1]["content"]) == greedy(DELTAS[0], prompt)
