"""Demo settings: flags over environment variables over defaults; `demo_main --no-launch` with a real base."""

from __future__ import annotations

import argparse

import pytest

from hf_delta.demo import DemoSettings, add_demo_arguments, demo_main, settings_from_env
from hf_delta.demo.options import settings_from_args
from hf_delta.errors import EngineConfigError
from hf_delta.utils.specs import DeltaSpec


def _args(*argv: str) -> argparse.Namespace:
    return add_demo_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_defaults_serve_the_small_zoo():
    settings = settings_from_args(_args(), env={})
    assert settings == DemoSettings(launch=True)
    assert settings.size == "small" and settings.base is None and settings.deltas == {}


def test_environment_then_flags():
    env = {"HF_DELTA_DEMO_BASE": "org/base", "HF_DELTA_DEMO_DELTAS": "m=org/m,c=org/c", "HF_DELTA_DEMO_SIZE": "micro"}
    assert settings_from_env(env) == DemoSettings(size="micro", base="org/base",
                                                  deltas={"m": DeltaSpec("org/m"), "c": DeltaSpec("org/c")})
    settings = settings_from_args(_args("--base", "org/other", "--delta", "x=org/x", "--delta", "y=./y", "--port",
                                        "7999", "--no-launch"), env=env)
    assert (settings.base, settings.deltas, settings.port, settings.launch, settings.size) == (
        "org/other", {"x": DeltaSpec("org/x"), "y": DeltaSpec("./y")}, 7999, False, "micro")


def test_deltas_need_a_base():
    with pytest.raises(EngineConfigError, match="without a base"):
        settings_from_args(_args("--delta", "x=org/x"), env={})


def test_demo_main_prepares_a_real_base_without_launching(demo_models, caplog):
    base, deltas, _ = demo_models
    args = _args("--base", str(base), "--delta", f"arith={deltas['llama-arith']}", "--no-launch")
    with caplog.at_level("INFO", logger="hf_delta.demo"):
        assert demo_main(args) == 0
    assert "not launching" in caplog.text and "arith" in caplog.text
