"""hf_delta's modules form layers without cycles (every import counted: function-level and TYPE_CHECKING too).

The layering, top to bottom; a module imports only from its own entry and from lines below it, and entries on
one line do not import each other. ``docs/architecture.md`` draws the same picture.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from import_graph import cycles, import_graph, layer_violations

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    [""],  # hf_delta/__init__.py: the lazy public API
    ["cli"],
    ["demo", "bench"],
    ["serving"],  # its __init__: lazy names of the subpackages
    ["serving.ray"],
    ["serving.api"],
    ["serving.training"],
    ["serving.engine"],
    ["integrations", "evaluation"],
    ["compression"],
    ["model"],
    ["layers_moe"],
    ["layers", "hub"],
    ["slots"],  # the layers' resident slot buffers
    ["storage"],
    ["methods"],  # its __init__: registers every built-in method
    ["methods.auto"],  # chooses among the methods below, per matrix
    ["methods.mixed_svd"],  # can take the size of BitDelta's weights (budget_bytes="bitdelta")
    ["methods.bitdelta", "methods.lowrank", "methods.deltazip"],
    ["methods._dispatch"],
    ["methods.registry"],
    ["methods.base"],
    ["config", "kernels"],
    ["zoo"],
    ["packing", "fingerprint", "extract", "calibration", "utils"],
    ["errors", "_version", "_deprecated"],
]


def _graph() -> dict[str, set[str]]:
    return import_graph([ROOT / "src", ROOT / "kernels"], "hf_delta")


def test_hf_delta_has_no_import_cycle():
    assert cycles(_graph()) == []


def test_hf_delta_imports_only_down_its_layers():
    assert layer_violations(_graph(), "hf_delta", LAYERS) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_finds_cycles_through_function_level_and_type_checking_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from . import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n",
        "c.py": "from pkg.a import f\n",
        "d.py": "import pkg.c\n",
        "sub/__init__.py": "from .e import g\n",
        "sub/e.py": "from .. import d\n",
    })
    graph = import_graph([root], "pkg")
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.c"} and graph["pkg.sub.e"] == {"pkg.d"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert layer_violations(graph, "pkg", [["sub"], ["d"], ["a"], ["b"], ["c"]]) == [
        "pkg is in no layer",
        "pkg.c imports pkg.a, which is on a line above it",
    ]
    assert layer_violations(graph, "pkg", [[""], ["d"], ["a"], ["b", "c"], ["sub"]]) == [
        "pkg.b imports pkg.c, which is on the same line as it",
        "pkg.c imports pkg.a, which is on a line above it",
        "pkg.sub.e imports pkg.d, which is on a line above it",
    ]


def test_light_imports_stay_light():
    code = ("import sys, hf_delta.serving, hf_delta.cli.main; hf_delta.cli.main.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'hf_delta.serving.training.trainer', 'hf_delta.serving.api.app', "
            "'hf_delta.cli.serve', 'gradio', 'ray', 'lm_eval') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_delta.cli.serve']"
