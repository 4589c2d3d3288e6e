"""The Gradio app: a Chat tab, a Compare tab and a Models tab over one running ``Engine``.

API endpoints (``gradio_client.Client(url).predict(..., api_name=...)``):

* ``/chat`` (message, history, model) → (history with the reply appended, cleared textbox); streams;
* ``/stop`` () → aborts what this session is streaming;
* ``/compare`` (prompt, models) → (summary, side-by-side HTML, result dict with per-answer latency);
* ``/models`` () → (models table, memory summary, memory chart data).

Bad input (an empty message, an unknown model, a prompt longer than the context) is caught by each event's
validator before anything runs: the UI shows the reason on the input at fault (the conversation stays as it
was) and API clients get a ``gradio_client.exceptions.ValidationError`` carrying it. Failures while a reply is
generated (a delta whose repo cannot be loaded) raise ``gr.Error`` (a toast). Other users are never affected.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import gradio as gr
import pandas as pd

from ..errors import HfDeltaError
from ..serving.engine.engine import Engine
from .models import COLUMNS, ModelCatalog
from .service import Comparison, DemoService
from .zerogpu import Runner

logger = logging.getLogger(__name__)

INTRO = """# hf_delta: many fine-tunes, one base
One base model sits in memory; every fine-tune is a compressed *delta* beside it (BitDelta: one bit per
weight plus scales). The engine batches requests for different fine-tunes into the same forward pass.
Replies are greedy, so the same prompt always gets the same answer."""

MODE_NOTES = {
    "chat": "**{model}** has a chat template of its own: the whole conversation is rendered through it.",
    "raw": "**{model}** has no chat template of its own: your latest message is sent as a raw prompt (without "
           "the earlier turns) and the model continues it.",
}

CHART_PARTS = ("base weights", "deltas (attached)", "deltas (CPU memory)")
CARD_CSS = ("display:flex;gap:12px;flex-wrap:wrap;", "flex:1 1 200px;border:1px solid #8884;border-radius:8px;"
            "padding:10px;min-width:180px;")


def _message(role: str, text: str) -> dict:
    # Text parts are shown as they are; a plain string would go through inspect.cleandoc (whitespace trimmed).
    return {"role": role, "content": [{"type": "text", "text": text}]}


def _error(err: BaseException) -> gr.Error:
    return gr.Error(str(err))


def _check(check, *args) -> str | None:
    """The message of the ``HfDeltaError`` that ``check(*args)`` raises, or None if it passes."""
    try:
        check(*args)
    except HfDeltaError as err:
        return str(err)
    return None


def _valid(problem: str | None) -> dict:
    return gr.validate(problem is None, problem or "")


def _mode(service: DemoService, model: str) -> str:
    try:
        return service.prompt_mode(model)
    except HfDeltaError:
        return "unavailable"


def _note(service: DemoService, model: str, examples: Mapping[str, Sequence[str]]) -> str:
    mode = _mode(service, model)
    note = MODE_NOTES.get(mode, "**{model}** cannot be used right now.").format(model=model)
    if examples.get(model):
        note += " Try: " + ", ".join(f"`{e}`" for e in examples[model][:2])
    return note


def _samples(model: str, examples: Mapping[str, Sequence[str]]) -> list[list[str]]:
    return [[e] for e in examples.get(model, [])] or [["Hello!"]]


def render_comparison(comparison: Comparison) -> tuple[str, str]:
    """Markdown summary and side-by-side HTML cards of a compare."""
    n = len(comparison.answers)
    if comparison.same_step:
        batch = f"one mixed batch: all {n} first tokens came out of the same forward pass"
    elif comparison.one_batch:
        batch = f"one mixed batch: all {n} requests were decoded together in the same forward passes"
    else:
        batch = "the running batch, but not all at once (some waited, e.g. for their delta to load)"
    summary = (f"**{n} answers**, served as {batch}; {comparison.engine_steps} engine steps, "
               f"{comparison.wall:.2f} s in all.")
    cards = []
    for a in comparison.answers:
        if a.error:
            body = f"<b>error:</b> {html.escape(a.error)}"
        else:
            body = f"<pre style='white-space:pre-wrap;margin:0'>{html.escape(a.text) or '(empty)'}</pre>"
        ttft = "" if a.ttft is None else f" · first token {a.ttft:.3f} s"
        cards.append(f"<div style='{CARD_CSS[1]}'><div><b>{html.escape(a.model)}</b></div>{body}"
                     f"<div style='opacity:.7;font-size:90%'>latency {a.latency:.3f} s{ttft} · "
                     f"{a.completion_tokens} tokens · {a.finish_reason}</div></div>")
    return summary, f"<div style='{CARD_CSS[0]}'>{''.join(cards)}</div>"


def build_demo(engine: Engine, *, finetunes: Mapping[str, Any] | None = None,
               examples: Mapping[str, Sequence[str]] | None = None, max_tokens: int = 64,
               title: str = "hf_delta demo", refresh_every: float = 5.0, runner: Runner | None = None) -> gr.Blocks:
    """The Gradio app serving ``engine`` (start the engine's loop first: ``engine.start()``).

    Args:
        engine: the serving engine (base + deltas).
        finetunes: delta name → folder of its full fine-tune, for exact size ratios (else estimated).
        examples: model name → example prompts shown under the chat box.
        max_tokens: most tokens per reply (greedy decoding).
        title: the browser tab's title.
        refresh_every: seconds between refreshes of the models panel (0 = only on demand).
        runner: runs each event's requests to the end (ZeroGPU: ``zerogpu.gpu_runner()``; the engine's loop is
            then not started); default: the engine's running loop streams them.

    >>> engine = Engine(base, deltas={"math": "./math-delta"}); engine.start()  # doctest: +SKIP
    >>> build_demo(engine).launch()  # doctest: +SKIP
    """
    service = DemoService(engine, max_tokens=max_tokens, runner=runner)
    catalog = ModelCatalog(engine, finetunes=finetunes)
    examples = dict(examples or {})
    names = service.model_names()
    deltas = names[1:]
    default = deltas[0] if deltas else names[0]
    choices = [(f"{n} · {_mode(service, n)}", n) for n in names]

    def turns(message: str, history: list[dict], model: str, session: str | None) -> Iterator[list[dict]]:
        """The conversation with ``message`` and the reply so far, after each new piece of the reply."""
        try:
            turn = [*history, _message("user", message)]
            text = ""
            for text in service.stream_reply(model, message, history, session=session):
                yield [*turn, _message("assistant", text)]
            yield [*turn, _message("assistant", text)]
        except HfDeltaError as err:
            raise _error(err) from err

    def respond(message: str, history: list[dict] | None, model: str,
                request: gr.Request) -> Iterator[tuple[list[dict], str]]:
        """The ``/chat`` API: (message, history, model) → (history with the reply, cleared textbox)."""
        for conversation in turns(message, list(history or []), model, getattr(request, "session_hash", None)):
            yield conversation, ""

    def accept(message: str, history: list[dict] | None, model: str) -> tuple[list[dict], str, str]:
        """UI step 1: show the message, clear the textbox (the user may type the next one meanwhile)."""
        return [*(history or []), _message("user", message)], "", message

    def reply(message: str, history: list[dict] | None, model: str, request: gr.Request) -> Iterator[list[dict]]:
        """UI step 2: stream the reply to the message ``accept`` put at the end of ``history``."""
        yield from turns(message, list(history or [])[:-1], model, getattr(request, "session_hash", None))

    def validate_chat(message: str, history: list[dict] | None, model: str) -> list[dict]:
        bad_model = _check(service.check_model, model)
        bad_message = None if bad_model else _check(service.build_prompt, model, message, list(history or []))
        return [_valid(bad_message), _valid(None), _valid(bad_model)]

    def validate_compare(prompt: str, models: list[str] | None) -> list[dict]:
        models = list(models or [])
        bad_models = next((p for p in (_check(service.check_model, m) for m in models) if p), None)
        if not models:
            bad_models = "Choose at least one model to compare."
        bad_prompt = None
        if not isinstance(prompt, str) or not prompt.strip():
            bad_prompt = "The prompt is empty: type something to compare."
        if not bad_models and not bad_prompt:
            for m in models:
                problem = _check(service.build_prompt, m, prompt)
                if problem:
                    bad_prompt = f"{m}: {problem}"
                    break
        return [_valid(bad_prompt), _valid(bad_models)]

    def stop(request: gr.Request) -> None:
        service.stop(getattr(request, "session_hash", None))

    def compare(prompt: str, models: list[str] | None) -> tuple[str, str, dict]:
        try:
            comparison = service.compare(list(models or []), prompt)
        except HfDeltaError as err:
            raise _error(err) from err
        summary, cards = render_comparison(comparison)
        return summary, cards, comparison.as_dict()

    def panel() -> tuple[pd.DataFrame, str, pd.DataFrame]:
        modes = {n: _mode(service, n) for n in names}
        table = pd.DataFrame([r.cells() for r in catalog.rows(modes)], columns=COLUMNS)
        memory = catalog.memory()
        chart = pd.DataFrame([{"part": k, "MB": round(memory[k], 3)} for k in CHART_PARTS])
        return table, catalog.memory_summary(memory), chart

    def on_model(model: str) -> tuple[str, gr.Dataset]:
        return _note(service, model, examples), gr.Dataset(samples=_samples(model, examples))

    with gr.Blocks(title=title) as demo:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row(equal_height=True):
                    model = gr.Dropdown(choices, value=default, label="Model", allow_custom_value=True, scale=1,
                                        elem_id="chat-model")
                    note = gr.Markdown(_note(service, default, examples), elem_id="chat-note")
                chatbot = gr.Chatbot(label="Conversation", height=400, elem_id="chatbot")
                with gr.Row():
                    msg = gr.Textbox(placeholder="Type a message, then Enter", label="Message", show_label=False,
                                     scale=5, elem_id="chat-input")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    stop_btn = gr.Button("Stop", variant="stop", scale=1, elem_id="chat-stop")
                    clear = gr.Button("Clear", scale=1)
                sample_box = gr.Dataset(components=[msg], samples=_samples(default, examples), label="Examples")
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    prompt = gr.Textbox(label="Prompt", scale=3, elem_id="compare-prompt",
                                        value=(examples.get(default) or [""])[0])
                    chosen = gr.Dropdown(choices, value=deltas or names, multiselect=True, allow_custom_value=True,
                                         label="Models", scale=3)
                    go = gr.Button("Compare", variant="primary", scale=1, elem_id="compare-go")
                summary = gr.Markdown(label="Summary")
                cards = gr.HTML(label="Answers", elem_id="compare-answers")
                with gr.Accordion("Result as JSON", open=False):
                    raw = gr.JSON(label="Result")
            with gr.Tab("Models", id="models"):
                table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Served models", elem_id="models-table")
                memory_note = gr.Markdown(elem_id="models-summary")
                chart = gr.BarPlot(x="part", y="MB", title="Weights held by the engine (MB)", sort=list(CHART_PARTS),
                                   height=240, label="Memory", elem_id="models-memory")
                refresh = gr.Button("Refresh")

        # The page runs two steps (show the message and clear the box at once, then stream the reply); API
        # clients get both in one call through /chat, bound to a hidden button. Each is validated first.
        # No progress overlay on the chat: the streaming reply itself shows progress.
        pending = gr.State("")
        api_button = gr.Button(visible=False)
        api_button.click(respond, [msg, chatbot, model], [chatbot, msg], validator=validate_chat, api_name="chat",
                         concurrency_limit=None, show_progress="hidden")
        chat_events = []
        for trigger in (send.click, msg.submit):
            accepted = trigger(accept, [msg, chatbot, model], [chatbot, msg, pending], validator=validate_chat,
                               queue=False, api_visibility="private", show_progress="hidden")
            chat_events.append(accepted.success(reply, [pending, chatbot, model], [chatbot], concurrency_limit=None,
                                                api_visibility="private", show_progress="hidden"))
        stop_btn.click(stop, None, None, api_name="stop", concurrency_limit=None, queue=False)
        clear.click(lambda: ([], ""), None, [chatbot, msg], api_visibility="private", queue=False)
        model.change(on_model, [model], [note, sample_box], api_visibility="private", queue=False)
        sample_box.click(lambda sample: sample[0], [sample_box], [msg], api_visibility="private", queue=False)

        compare_io = {"fn": compare, "inputs": [prompt, chosen], "outputs": [summary, cards, raw],
                      "validator": validate_compare, "concurrency_limit": None}
        compared = go.click(**compare_io, api_name="compare")
        prompt.submit(**compare_io, api_visibility="undocumented")

        panel_io = {"fn": panel, "inputs": None, "outputs": [table, memory_note, chart], "show_progress": "hidden"}
        refresh.click(**panel_io, api_name="models")
        demo.load(**panel_io, api_visibility="private")
        for event in (*chat_events, compared):
            event.then(**panel_io, api_visibility="private")
        if refresh_every:
            gr.Timer(refresh_every).tick(**panel_io, api_visibility="private")
    return demo
