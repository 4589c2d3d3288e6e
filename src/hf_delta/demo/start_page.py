"""The page served while the demo starts: the stage running now, the percent done and the time left.

``run_demo`` launches it before it builds or loads anything, then closes it and launches the app on the same
port. The page polls the server's ``config`` and reloads itself once the app answers there instead of it, so
an open tab turns into the app without the user doing anything.
"""

from __future__ import annotations

import html

import gradio as gr

from .startup import Snapshot, StartupProgress, format_seconds

# The start page's status element; the page reloads once the server's config no longer has it.
START_PAGE_ID = "hf-delta-start-page"

_RELOAD_WHEN_THE_APP_ANSWERS = f"""
() => {{
  const configUrl = new URL("config", window.location.href.split("?")[0].replace(/\\/?$/, "/"));
  setInterval(async () => {{
    try {{
      const response = await fetch(configUrl, {{cache: "no-store"}});
      if (response.ok && !(await response.text()).includes("{START_PAGE_ID}")) window.location.reload();
    }} catch (err) {{}}  // the server is switching from this page to the app: try again
  }}, 1500);
}}
"""


def render_snapshot(snapshot: Snapshot) -> str:
    """The status as HTML: stage, a bar with the percent, time left and time so far (or the error)."""
    if snapshot.error:
        return (
            f"<p><b>The demo could not start.</b></p><pre>{html.escape(snapshot.error)}</pre>"
            "<p>The server log has the details.</p>"
        )
    if snapshot.ready:
        return "<p><b>Ready.</b> Opening the app...</p>"
    percent = max(0.0, min(100.0, snapshot.percent))
    return (
        f"<p>Stage: <b>{html.escape(snapshot.stage)}</b></p>"
        f'<progress max="100" value="{percent:.1f}" style="width:100%"></progress>'
        f"<p>{percent:.0f}% done &middot; about {format_seconds(snapshot.eta_s)} left &middot; "
        f"{format_seconds(snapshot.elapsed_s)} so far</p>"
    )


def build_start_page(
    progress: StartupProgress, *, title: str = "hf_delta demo", refresh_every: float = 1.0
) -> gr.Blocks:
    """The start page over ``progress`` (refreshed every ``refresh_every`` seconds)."""
    with gr.Blocks(title=title) as page:
        gr.Markdown(
            "# hf_delta: starting\n"
            "This first start builds the models the demo serves and compresses each fine-tune into a delta. "
            "Later starts find them cached. This page turns into the demo when the deltas are ready."
        )
        status = gr.HTML(render_snapshot(progress.snapshot()), elem_id=START_PAGE_ID)
        timer = gr.Timer(refresh_every)
        timer.tick(
            lambda: render_snapshot(progress.snapshot()), outputs=status, api_name="progress", show_progress="hidden"
        )
        page.load(None, js=_RELOAD_WHEN_THE_APP_ANSWERS)
    return page
