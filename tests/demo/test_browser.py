"""The page in headless Chromium (Debian's package, driven by Playwright), served by the Space that
``hf-delta space build`` wrote and a fresh virtual environment runs: load it, chat, see a bad-input message,
and save a screenshot; and the first start's page, which reloads itself into the app when it is ready.
Fails, never skips, when Chromium or Playwright is missing: CI installs them (apt-get install -y chromium;
pip install playwright)."""

from __future__ import annotations

import time
import urllib.request

import pytest
from demo_constants import DELTAS

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_page_chats_and_shows_bad_input_in_chromium(space_app, demo_models, greedy, tmp_path):
    from hf_delta.demo.browser import open_page, pick_model, screenshot, send_message

    _, _, examples = demo_models
    prompt = examples["llama-chat"][0]
    with open_page(space_app.url) as page:
        assert page.get_by_role("tab", name="Compare").is_visible()
        pick_model(page, "llama-chat")
        send_message(page, prompt, expect=greedy("llama-chat", prompt))
        bots = page.locator("#chatbot [data-testid='bot']")
        assert bots.count() == 1
        assert page.locator("#chatbot [data-testid='user']").first.inner_text().strip() == prompt

        send_message(page, "   ")  # bad input: shown on the textbox, the conversation stays
        page.get_by_text("The message is empty").first.wait_for()
        assert bots.count() == 1

        path = screenshot(page, tmp_path / "page.png")
        # After the bad input, the page still serves: a raw-prompt fine-tune answers.
        pick_model(page, DELTAS[0])
        send_message(page, examples[DELTAS[0]][0])
        assert bots.count() == 2
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_an_open_start_page_turns_into_the_app(starting_demo, tmp_path):
    from hf_delta.demo.browser import open_page, screenshot
    from hf_delta.demo.start_page import START_PAGE_ID

    deadline = time.monotonic() + 120
    while True:  # the start page comes up while the first start is held
        try:
            with urllib.request.urlopen(starting_demo.url, timeout=5):
                break
        except OSError:
            assert time.monotonic() < deadline, "the start page did not open"
            time.sleep(0.3)
    with open_page(starting_demo.url, ready=f"#{START_PAGE_ID}") as page:
        status = page.locator(f"#{START_PAGE_ID}")
        status.get_by_text("fine-tune llama-facts").wait_for()
        assert "25% done" in status.inner_text()
        shot = screenshot(page, tmp_path / "start.png")
        starting_demo.release.set()
        page.locator("#chat-input textarea").wait_for(timeout=180_000)  # reloaded itself into the app
        assert page.get_by_role("tab", name="Compare").is_visible()
    assert shot.read_bytes().startswith(b"\x89PNG")
