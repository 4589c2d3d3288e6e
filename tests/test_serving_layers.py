"""The layering of the serving stack (ARCHITECTURE/REDESIGN): cli > demo | bench > serving.ray > serving.api >
serving.training > serving.engine > the core. No module imports up or sideways, and none of these modules is
in an import cycle, counting function-level and TYPE_CHECKING imports. Also: light imports stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "_support"))

from import_graph import cycles, import_graph  # noqa: E402

LAYERS = [  # highest first; the core (everything else in hf_delta) is below them all
    ("hf_delta.cli",),
    ("hf_delta.demo", "hf_delta.bench"),
    ("hf_delta.serving.ray",),
    ("hf_delta.serving", "hf_delta.serving.api"),  # the package facade names api/training/engine lazily
    ("hf_delta.serving.training",),
    ("hf_delta.serving.engine",),
]


def _layer(module: str) -> tuple[int, str]:
    """(rank, group) of a module: rank 0 for the core, higher is further up."""
    best: tuple[int, str] = (0, "core")
    best_len = 0
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = (len(LAYERS) - i, prefix), len(prefix)
    return best


def _graph() -> dict[str, set[str]]:
    return import_graph([ROOT / "src", ROOT / "kernels"], "hf_delta")


def test_no_module_of_the_serving_stack_imports_up_or_sideways():
    bad = []
    for module, targets in _graph().items():
        rank, group = _layer(module)
        for target in targets:
            t_rank, t_group = _layer(target)
            if t_rank > rank or (t_rank == rank and rank and t_group != group and module != "hf_delta.serving"):
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_no_import_cycle_touches_the_serving_stack():
    stack = [c for c in cycles(_graph()) if any(_layer(m)[0] for m in c)]
    assert stack == []


def test_light_imports_stay_light():
    code = ("import sys, hf_delta.serving, hf_delta.cli.main; hf_delta.cli.main.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'hf_delta.serving.training.trainer', 'hf_delta.serving.api.app', "
            "'hf_delta.cli.serve', 'gradio', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_delta.cli.serve']"
