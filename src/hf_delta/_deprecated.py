"""Old import paths, kept for one release (hf_delta 0.2 removes them); each use warns with the new path.

Modules are aliased by a small ``sys.meta_path`` finder: ``import hf_delta._loading`` returns the module
``hf_delta.utils.loading`` itself (one module object, so state and monkeypatching stay shared). Names moved
out of a package are served by that package's ``__getattr__`` through :func:`moved_attribute`. Everything
here works on strings and imports only when a deprecated path is used, so no layer depends on another
through this file.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

REMOVED_IN = "0.2"

# old module path -> new module path
MOVED_MODULES: dict[str, str] = {
    "hf_delta._io": "hf_delta.utils.io",
    "hf_delta._loading": "hf_delta.utils.loading",
    "hf_delta.fidelity": "hf_delta.bench.fidelity",
    "hf_delta.zoo.report": "hf_delta.bench.zoo_eval",
    "hf_delta.serving.config": "hf_delta.serving.engine.config",
    "hf_delta.serving.scheduler": "hf_delta.serving.engine.scheduler",
    "hf_delta.serving.step": "hf_delta.serving.engine.step",
    "hf_delta.serving.kv_cache": "hf_delta.serving.engine.kv_cache",
    "hf_delta.serving.residency": "hf_delta.serving.engine.residency",
    "hf_delta.serving.sampling": "hf_delta.serving.engine.sampling",
    "hf_delta.serving.handles": "hf_delta.serving.engine.handles",
    "hf_delta.serving.server": "hf_delta.serving.api.app",
    "hf_delta.serving.protocol": "hf_delta.serving.api.protocol",
    "hf_delta.serving.finetune_routes": "hf_delta.serving.api.fine_tuning",
    "hf_delta.serving.finetune": "hf_delta.serving.training.jobs",
    "hf_delta.serving.lora_trainer": "hf_delta.serving.training.trainer",
    "hf_delta.serving.coserve": "hf_delta.serving.training.budget",
    "hf_delta.serving.cli": "hf_delta.cli.serve",
    "hf_delta.serving.bench": "hf_delta.bench.workload",
    "hf_delta.serving.benchmark": "hf_delta.bench.serve",
    "hf_delta.serving.coserve_bench": "hf_delta.bench.coserve",
    "hf_delta.serving.ray_bench": "hf_delta.bench.ray",
    "hf_delta.serving.synthetic": "hf_delta.bench.synthetic",
}

# (package, attribute) -> new module that defines it
MOVED_ATTRIBUTES: dict[tuple[str, str], str] = {
    ("hf_delta.methods", "export_peft_lora"): "hf_delta.integrations.peft",
    ("hf_delta.evaluation", "bf16_weight_bytes"): "hf_delta.utils.sizes",
    ("hf_delta.evaluation", "folder_bytes"): "hf_delta.utils.sizes",
}


def _warn(old: str, new: str) -> None:
    # Point at the user's import: skip this file and the package __getattr__ that called it (importlib's own
    # frames are skipped by the warnings module itself, so they are not counted).
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called _warn
    while frame is not None:
        code = frame.f_code
        internal = "importlib" in code.co_filename and "_bootstrap" in code.co_filename
        if not internal:
            if code.co_filename != __file__ and code.co_name != "__getattr__":
                break
            level += 1
        frame = frame.f_back
    warnings.warn(f"{old} is deprecated and will be removed in hf_delta {REMOVED_IN}; use {new} instead.",
                  DeprecationWarning, stacklevel=level)


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The aliased module ran when it was first imported under its new name."""


def install_module_aliases() -> None:
    """Make the old module paths importable (once per process)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())


def moved_attribute(package: str, name: str) -> Any:
    """The value of a name that moved out of ``package`` (for that package's ``__getattr__``)."""
    new = MOVED_ATTRIBUTES.get((package, name))
    if new is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    _warn(f"{package}.{name}", f"{new}.{name}")
    value = getattr(importlib.import_module(new), name)
    vars(sys.modules[package])[name] = value  # `from package import name` looks it up twice: warn once
    return value
