"""ZeroGPU Spaces: the model work of each chat or compare runs inside one ``@spaces.GPU`` call.

On ZeroGPU hardware a GPU is attached only while a function decorated with ``spaces.GPU`` runs, so the engine
cannot step in a background thread of its own. There the demo leaves the engine's loop stopped and answers each
event by submitting its requests and stepping the engine until they are finished, inside the decorated function;
the function returns plain results (no handles), which is all a call that runs elsewhere can hand back. Without
the ``spaces`` package (CPU hardware, a laptop) nothing here is used and the engine steps in its thread as usual.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence

from ..serving.engine.engine import Engine
from ..serving.engine.handles import GenerationResult
from ..serving.engine.sampling import SamplingParams

Request = tuple[str, Sequence[int], SamplingParams]
"""(model name, prompt token ids, sampling parameters)."""
Runner = Callable[[Engine, Sequence[Request]], list[GenerationResult | Exception]]


def on_zerogpu() -> bool:
    """Whether the ``spaces`` package (present on ZeroGPU Spaces) is importable."""
    return importlib.util.find_spec("spaces") is not None


def run_requests(engine: Engine, requests: Sequence[Request]) -> list[GenerationResult | Exception]:
    """Submit ``requests`` together (one mixed batch) and step ``engine`` here until every one has finished.

    Returns each request's result, or the exception it failed with (other requests still finish).
    """
    handles = [engine.submit(model, list(ids), params=params) for model, ids, params in requests]
    while not all(handle.done for handle in handles):
        if engine.step() == 0:
            time.sleep(0.002)  # waiting on a delta load: do not spin
    results: list[GenerationResult | Exception] = []
    for handle in handles:
        try:
            results.append(handle.result())
        except Exception as err:  # e.g. a delta that cannot load: only its own answer fails
            results.append(err)
    return results


def gpu_runner() -> Runner:
    """``run_requests`` decorated with ``spaces.GPU`` (call before the app launches: ZeroGPU looks for its GPU
    functions at start-up)."""
    import spaces

    return spaces.GPU(run_requests)
