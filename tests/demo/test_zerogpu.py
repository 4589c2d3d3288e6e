"""ZeroGPU: with the ``spaces`` package importable, the engine steps only inside ``@spaces.GPU`` calls."""

from __future__ import annotations

import sys
import types

from demo_constants import DELTAS, MAX_TOKENS


def test_with_spaces_present_every_event_runs_inside_a_gpu_call(demo_models, greedy, monkeypatch, torch_one_thread):
    from hf_delta.demo import zerogpu
    from hf_delta.demo.launch import DemoModels, start_engine
    from hf_delta.demo.service import DemoService
    from hf_delta.serving.engine import EngineConfig

    calls = []

    def gpu(fn):  # what ZeroGPU's decorator promises: the function runs (with a GPU attached) when called
        def inside_gpu_call(*args, **kwargs):
            calls.append(len(args[1]))
            return fn(*args, **kwargs)

        return inside_gpu_call

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    monkeypatch.setattr(zerogpu.importlib.util, "find_spec", lambda name: object() if name == "spaces" else None)
    assert zerogpu.on_zerogpu()
    base, deltas, examples = demo_models
    engine = start_engine(
        DemoModels(base=base, deltas=deltas), config=EngineConfig(kv_cache_tokens=4096), gpu_calls=True
    )
    try:
        assert not engine.is_running  # no background loop: nothing steps outside a GPU call
        service = DemoService(engine, max_tokens=MAX_TOKENS, runner=zerogpu.gpu_runner())
        prompt = examples[DELTAS[0]][0]
        assert service.reply(DELTAS[0], prompt) == greedy(DELTAS[0], prompt)
        assert calls == [1]
        comparison = service.compare(list(DELTAS), prompt)
        assert calls == [1, len(DELTAS)]  # one GPU call for the whole mixed batch
        assert [a.text for a in comparison.answers] == [greedy(name, prompt) for name in DELTAS]
        assert comparison.one_batch
        assert not engine.is_running
    finally:
        engine.close()
