"""The hf_delta demo: a Gradio app (chat, side-by-side compare, models panel) over one serving ``Engine``.

Importing this package does not import gradio: ``hf-delta demo`` wires its arguments from here.

>>> from hf_delta.demo.app import build_demo  # doctest: +SKIP
>>> build_demo(engine).launch()  # doctest: +SKIP
"""

from .options import add_demo_arguments, demo_main
from .settings import DemoSettings, settings_from_env

__all__ = ["DemoSettings", "add_demo_arguments", "demo_main", "settings_from_env"]
