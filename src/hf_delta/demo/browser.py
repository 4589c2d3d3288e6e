"""Drive the demo page in headless Chromium (Playwright + the system's Chromium): for the browser test and the
README screenshot. Needs ``pip install playwright`` and a Chromium binary (Debian: ``apt-get install chromium``);
``playwright install`` is not needed.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import HfDeltaError

CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserNotFoundError(HfDeltaError, FileNotFoundError):
    """No Chromium binary (or no Playwright) to drive the demo page with."""


def find_chromium() -> str:
    """``$HF_DELTA_CHROMIUM``, else the first Chromium on ``PATH``; raises ``BrowserNotFoundError``."""
    explicit = os.environ.get("HF_DELTA_CHROMIUM")
    if explicit:
        if not Path(explicit).is_file():
            raise BrowserNotFoundError(f"HF_DELTA_CHROMIUM={explicit!r} is not a file.")
        return explicit
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserNotFoundError(f"No Chromium found on PATH (looked for {', '.join(CANDIDATES)}). Install it "
                               "(Debian/Ubuntu: apt-get install -y chromium) or set HF_DELTA_CHROMIUM.")


@contextmanager
def open_page(url: str, *, width: int = 1280, height: int = 900, timeout_s: float = 30.0,
              ready: str = "#chat-input textarea") -> Iterator[Any]:
    """A Playwright page on ``url`` in a fresh headless Chromium (a new temporary profile every time), once the
    element ``ready`` is there (the chat box; ``"#hf-delta-start-page"`` for the first start's page)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise BrowserNotFoundError("Playwright is not installed: pip install playwright (its bundled browsers "
                                   "are not needed; the system Chromium is used).") from err
    executable = find_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_s * 1000)
            page.goto(url)
            page.locator(ready).wait_for()
            yield page
        finally:
            browser.close()


def pick_model(page: Any, model: str) -> None:
    """Choose ``model`` in the chat tab's dropdown."""
    box = page.locator("#chat-model input")
    box.click()
    page.get_by_role("option", name=model).first.click()
    page.locator("#chat-note").get_by_text(model).first.wait_for()


def send_message(page: Any, message: str, *, expect: str | None = None, tries: int = 30) -> None:
    """Type ``message`` in the chat box and send it; wait for the reply (until it shows ``expect``, if given).

    A click while the previous reply's event is still finishing is dropped by Gradio (each event runs once at a
    time per page), so the click is repeated until the message shows up in the conversation.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    users = page.locator("#chatbot [data-testid='user']")
    bots = page.locator("#chatbot [data-testid='bot']")
    sent, answered = users.count(), bots.count()
    page.locator("#chat-input textarea").fill(message)
    if not message.strip():
        page.locator("#chat-send").click()
        return
    for _ in range(tries):
        page.locator("#chat-send").click()
        try:
            users.nth(sent).wait_for(state="attached", timeout=1000)
            break
        except PlaywrightTimeout:
            continue
    else:
        raise TimeoutError(f"The message {message!r} was not accepted after {tries} clicks on Send.")
    bots.nth(answered).wait_for(state="attached")  # a reply of only whitespace is attached but not visible
    if expect and expect.strip():
        bots.nth(answered).get_by_text(expect.strip()).first.wait_for()


def open_tab(page: Any, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def compare(page: Any, prompt: str) -> None:
    """Run a compare of ``prompt`` (with the models already chosen) and wait for the answers."""
    open_tab(page, "Compare")
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-go").click()
    page.locator("#compare-answers").get_by_text("latency").first.wait_for()


def wait_for_text(page: Any, selector: str, text: str) -> None:
    """Wait until the element ``selector`` contains ``text`` (whether or not Playwright deems it visible)."""
    script = "([s, t]) => { const e = document.querySelector(s); return !!e && e.innerText.includes(t); }"
    page.wait_for_function(script, arg=[selector, text])


def screenshot(page: Any, path: str | Path) -> Path:
    """Save the whole page as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path
