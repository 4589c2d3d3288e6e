"""Start the demo: pick the models (the zoo by default, or a real base and Hub deltas), start the engine, warm
the deltas, build the app and launch it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..serving.engine.config import EngineConfig
from ..serving.engine.engine import Engine
from ..serving.engine.sampling import SamplingParams
from ..utils.specs import DeltaSpec
from .settings import DemoSettings
from .startup import StartupProgress

logger = logging.getLogger(__name__)


@dataclass
class DemoModels:
    """What to serve: a base, deltas, and what the app may show about them."""

    base: str | Path
    deltas: dict[str, DeltaSpec | str | Path]  # a folder or Hub id, or a spec with a revision
    finetunes: dict[str, Path] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)


def resolve_models(settings: DemoSettings, *, progress: StartupProgress | None = None) -> DemoModels:
    """The real base and deltas of ``settings``, or else the zoo (built and compressed on first use, each step
    told to ``progress``)."""
    if settings.base:
        return DemoModels(base=settings.base, deltas=dict(settings.deltas))
    from .zoo_deltas import prepare_zoo_demo

    zoo = prepare_zoo_demo(settings.size, zoo_dir=settings.zoo_dir, cache_dir=settings.cache_dir,
                           base=settings.zoo_base, progress=progress)
    return DemoModels(base=zoo.base, deltas=dict(zoo.deltas), finetunes=zoo.finetunes, examples=zoo.examples)


def start_engine(models: DemoModels, *, config: EngineConfig | None = None, warm: bool = True,
                 gpu_calls: bool = False, **engine_kwargs: Any) -> Engine:
    """An ``Engine`` over ``models`` with its loop running; ``warm`` loads every delta that fits a device slot
    (one 1-token request each), so the first chat or compare does not wait for a load.

    With ``gpu_calls`` (ZeroGPU) the loop is not started: each event steps the engine inside its own
    ``@spaces.GPU`` call (``zerogpu.run_requests``); the base goes to CUDA, and nothing is warmed up at start.
    """
    if gpu_calls:
        import torch

        if torch.cuda.is_available():  # on ZeroGPU, CUDA tensors made here move to the GPU when a call runs
            engine_kwargs.setdefault("device", "cuda")
    engine = Engine(models.base, config=config or EngineConfig(), **engine_kwargs)
    for name, spec in models.deltas.items():
        spec = spec if isinstance(spec, DeltaSpec) else DeltaSpec(str(spec))
        engine.register_delta(name, spec.repo, revision=spec.revision)
    if gpu_calls:
        return engine
    engine.start()
    if warm:
        warm_up(engine)
    return engine


def warm_up(engine: Engine) -> None:
    """Load the deltas (up to the engine's device slots) with one 1-token request each; failures are logged."""
    names = engine.model_names()[1 : 1 + engine.config.device_slots]
    handles = []
    for name in names:
        try:
            handles.append((name, engine.submit(name, [engine.tokenizer_for(name).eos_token_id or 0],
                                                params=SamplingParams(max_tokens=1))))
        except Exception as err:  # a broken delta is shown in the models panel; it does not stop the demo
            logger.warning("Delta %s could not be warmed up: %s", name, err)
    for name, handle in handles:
        try:
            handle.result()
        except Exception as err:
            logger.warning("Delta %s could not be warmed up: %s", name, err)


@dataclass
class LaunchedDemo:
    """The demo serving in the background (``run_demo(..., block=False)``): close it when done."""

    app: Any  # the gr.Blocks
    engine: Engine
    url: str

    def close(self) -> None:
        self.app.close()
        self.engine.close()


def run_demo(settings: DemoSettings, *, block: bool = True) -> LaunchedDemo | None:
    """Prepare the models and, unless ``settings.launch`` is false, serve the app.

    While the models are built, compressed or downloaded and the engine starts, a start page with the progress
    is served on the same address; it turns into the app when everything is ready.

    Args:
        settings: what to serve and where.
        block: serve until interrupted (then close everything); ``False`` returns once the app serves.

    Returns:
        The running demo with ``block=False``; ``None`` otherwise (and with ``launch=False``).
    """
    if not settings.launch:
        models = resolve_models(settings)
        logger.info("Models ready: base %s, deltas %s (not launching)", models.base, sorted(models.deltas))
        return None
    from .app import build_demo
    from .start_page import build_start_page
    from .zerogpu import gpu_runner, on_zerogpu

    runner = gpu_runner() if on_zerogpu() else None  # before any launch: ZeroGPU looks for GPU functions then
    progress = StartupProgress()
    page = build_start_page(progress)
    _, url, _ = page.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True)
    logger.info("Start page at %s: it turns into the demo when the models are ready", url)
    port = page.server_port
    try:
        models = resolve_models(settings, progress=progress)
        progress.begin("starting the engine: loading the base and warming up the deltas")
        engine = start_engine(models, gpu_calls=runner is not None)
    except BaseException as err:
        progress.fail(err)
        page.close()
        raise
    try:
        demo = build_demo(engine, finetunes=models.finetunes, examples=models.examples,
                          max_tokens=settings.max_tokens, runner=runner)
        progress.finish()
        page.close()
        _, url, _ = demo.launch(server_name=settings.host, server_port=port, prevent_thread_lock=not block)
    except BaseException:
        engine.close()
        raise
    if block:  # launch returned: the server was stopped
        engine.close()
        return None
    return LaunchedDemo(app=demo, engine=engine, url=url)
