"""Refresh the demo screenshots: docs/images/space.png (the README's) plus the compare and models tabs.

Launches the app on the small zoo (built and compressed on first use), chats in headless Chromium and saves
the pages. Needs Chromium (apt-get install -y chromium) and Playwright (pip install playwright).

    python space/screenshot.py [--size small|micro] [--out docs/images]
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from hf_delta.demo import DemoSettings
from hf_delta.demo.app import build_demo
from hf_delta.demo.browser import compare, open_page, open_tab, pick_model, screenshot, send_message, wait_for_text
from hf_delta.demo.launch import resolve_models, start_engine
from hf_delta.demo.service import DemoService

ROOT = Path(__file__).resolve().parent.parent
logger = logging.getLogger("screenshot")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=["small", "micro"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("hf_delta").setLevel(logging.INFO)
    logger.setLevel(logging.INFO)

    models = resolve_models(DemoSettings(size=args.size))
    engine = start_engine(models)
    demo = build_demo(engine, finetunes=models.finetunes, examples=models.examples, refresh_every=0)
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True, server_name="127.0.0.1")
    out = Path(args.out)
    try:
        with open_page(url, width=1280, height=860) as page:
            chat = models.examples.get("llama-chat", ["hello"])
            pick_model(page, "llama-chat")
            service, history = DemoService(engine), []
            for message in chat[:2]:
                reply = service.reply("llama-chat", message, history)  # greedy: what the page will show
                history += [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
                send_message(page, message, expect=reply)
            logger.info("Saved %s", screenshot(page, out / "space.png"))
            compare(page, models.examples.get("llama-arith", ["add 3 to 1 2 3 4 ="])[0])
            logger.info("Saved %s", screenshot(page, out / "space-compare.png"))
            open_tab(page, "Models")
            wait_for_text(page, "#models-table", "resident")
            page.wait_for_timeout(1500)  # let the chart draw
            logger.info("Saved %s", screenshot(page, out / "space-models.png"))
    finally:
        demo.close()
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
