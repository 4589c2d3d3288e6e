"""The Space folder: the README's YAML header, requirements, and app.py as an entry point."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from packaging.requirements import Requirement

SPACE = Path(__file__).resolve().parents[2] / "space"


def test_readme_has_the_spaces_header():
    text = (SPACE / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert (SPACE / header["app_file"]).is_file()
    assert isinstance(header["python_version"], str) and header["python_version"].startswith("3.")
    import gradio

    assert str(header["sdk_version"]).split(".")[0] == gradio.__version__.split(".")[0]  # the major we test with


def test_requirements_install_hf_delta_with_the_demo_extras():
    lines = [ln.strip() for ln in (SPACE / "requirements.txt").read_text().splitlines()]
    reqs = [Requirement(ln) for ln in lines if ln and not ln.startswith("#")]
    assert any(r.name == "hf_delta" and "demo" in r.extras for r in reqs)


def test_space_app_runs_as_an_entry_point(demo_models):
    base, deltas, _ = demo_models
    spec = importlib.util.spec_from_file_location("space_app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--base", str(base), "--delta", f"facts={deltas['llama-facts']}", "--no-launch"]) == 0
