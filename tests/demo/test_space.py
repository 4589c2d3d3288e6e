"""``hf-delta space build``: the Space folder, its push to a (local) Hub, and the folder installed into a fresh
virtual environment the way the Spaces builder installs it, answering a chat."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from demo_constants import DELTAS
from packaging.requirements import Requirement

from hf_delta.cli.main import main
from hf_delta.demo.space import SCREENSHOT, build_space, find_checkout, space_requirements
from hf_delta.errors import SpaceBuildError

FILES = {"README.md", "app.py", "requirements.txt", "space.json", SCREENSHOT}


def _wheel(folder: Path) -> Path:
    (wheel,) = folder.glob("hf_delta-*.whl")
    return wheel


def _header(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_the_folder_holds_app_readme_requirements_wheel_and_screenshot(space_folder, demo_models):
    assert {p.name for p in space_folder.iterdir()} == FILES | {_wheel(space_folder).name}
    header = _header(space_folder)
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    import gradio

    assert header["sdk_version"] == gradio.__version__  # the Spaces builder installs this gradio
    assert header["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"]({SCREENSHOT})" in (space_folder / "README.md").read_text()  # shown from the Space's own file
    assert (space_folder / SCREENSHOT).read_bytes().startswith(b"\x89PNG")
    with zipfile.ZipFile(_wheel(space_folder)) as wheel:
        names = set(wheel.namelist())
    assert {"hf_delta/__init__.py", "hf_delta/demo/space_app.py", "hf_delta/kernels/__init__.py"} <= names
    base, deltas, _ = demo_models
    variables = json.loads((space_folder / "space.json").read_text())["variables"]
    assert variables["HF_DELTA_DEMO_BASE"] == str(base)
    assert variables["HF_DELTA_DEMO_DELTAS"] == ",".join(f"{n}={p}" for n, p in deltas.items())


def test_requirements_name_registry_packages_only(space_folder):
    lines = [ln.strip() for ln in (space_folder / "requirements.txt").read_text().splitlines() if ln.strip()]
    reqs = {r.name: r for r in map(Requirement, lines)}  # options (-f, --extra-index-url) would not parse
    assert all(r.url is None and r.marker is None for r in reqs.values())
    assert "hf_delta" not in reqs  # it travels as the wheel; the builder cannot see the folder's files
    assert str(reqs["torch"].specifier) == f"=={version('torch').split('+')[0]}"
    assert str(reqs["gradio"].specifier) == f"=={version('gradio')}"
    with zipfile.ZipFile(_wheel(space_folder)) as wheel:
        metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()
    needed = {
        Requirement(ln.split(":", 1)[1]).name
        for ln in metadata.splitlines()
        if ln.startswith("Requires-Dist:") and ("extra ==" not in ln or '"demo"' in ln)
    }
    assert needed <= set(reqs)
    assert space_requirements(_wheel(space_folder)) == lines


def test_a_rebuild_replaces_the_folder_and_bad_input_is_refused(space_folder, tmp_path):
    out = tmp_path / "space"
    out.mkdir()
    (out / "stale.txt").write_text("from an older build")
    build_space(out, wheel=_wheel(space_folder), screenshot=space_folder / SCREENSHOT, size="micro")
    assert {p.name for p in out.iterdir()} == FILES | {_wheel(space_folder).name}
    assert json.loads((out / "space.json").read_text()) == {"variables": {"HF_DELTA_DEMO_SIZE": "micro"}}
    with pytest.raises(SpaceBuildError, match="without a base"):
        build_space(tmp_path / "x", deltas={"a": ("org/a", None)}, wheel=_wheel(space_folder))
    with pytest.raises(SpaceBuildError, match="not inside an hf_delta checkout"):
        find_checkout(tmp_path / "site-packages" / "hf_delta" / "demo" / "space.py")
    assert (find_checkout() / "pyproject.toml").is_file()


@pytest.mark.hub
def test_push_creates_the_space_with_every_file_and_pushing_again_updates_it(
    hub, hub_errors_fail, repo_id, space_folder, tmp_path, capsys
):
    from huggingface_hub import HfApi, hf_hub_download

    out = tmp_path / "space"
    common = ["space", "build", str(out), "--wheel", str(_wheel(space_folder)), "--push", repo_id, "--private"]
    assert main([*common, "--title", "First title"]) == 0
    assert f"Pushed to the Space {repo_id}" in capsys.readouterr().out
    api = HfApi()
    files = set(api.list_repo_files(repo_id, repo_type="space"))
    assert FILES | {_wheel(space_folder).name} <= files
    assert api.repo_info(repo_id, repo_type="space").private
    commits = len(api.list_repo_commits(repo_id, repo_type="space"))

    assert main([*common, "--title", "Second title"]) == 0
    assert len(api.list_repo_commits(repo_id, repo_type="space")) == commits + 1
    readme = Path(hf_hub_download(repo_id, "README.md", repo_type="space", cache_dir=tmp_path / "dl"))
    assert _header(readme.parent)["title"] == "Second title"
    for name in FILES | {_wheel(space_folder).name}:  # every file as built
        pushed = hf_hub_download(repo_id, name, repo_type="space", cache_dir=tmp_path / "dl")
        assert Path(pushed).read_bytes() == (out / name).read_bytes(), name


@pytest.mark.slow
def test_the_space_installed_like_the_spaces_builder_does_answers_a_chat(space_app, demo_models, greedy, tmp_path):
    from gradio_client import Client

    _, _, examples = demo_models
    client = Client(space_app.url, verbose=False)
    for name in (DELTAS[0], "llama-chat"):
        prompt = examples[name][0]
        history, _ = client.predict(prompt, [], name, api_name="/chat")
        assert "".join(part["text"] for part in history[-1]["content"]) == greedy(name, prompt)
    # hf_delta came from the folder's wheel, not from the registry or this checkout.
    python = space_app.venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    alone = subprocess.run([str(python), "-c", "import hf_delta"], capture_output=True, env=env, cwd=tmp_path)
    assert alone.returncode != 0 and b"No module named 'hf_delta'" in alone.stderr
    (unpacked,) = space_app.wheel_cache.iterdir()
    assert unpacked.name.startswith(_wheel(space_app.folder).stem) and (unpacked / "hf_delta" / "demo").is_dir()
