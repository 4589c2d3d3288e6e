"""The public surface: lazy ``hf_delta`` names, the extension contract, errors, and deprecated old paths."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hf_delta


def test_importing_hf_delta_loads_neither_torch_nor_transformers():
    code = "import sys, hf_delta; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_public_name_resolves_and_all_lists_them():
    assert sorted(hf_delta.__all__) == sorted(["__version__", *hf_delta._EXPORTS])
    for name in hf_delta.__all__:
        assert getattr(hf_delta, name) is not None
    assert set(hf_delta.__all__) <= set(dir(hf_delta))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_delta.nope  # noqa: B018


def test_the_extension_contract_and_the_errors_are_public():
    from hf_delta.methods.base import CompressedWeight, CompressionContext, DeltaMethod

    assert (hf_delta.CompressedWeight, hf_delta.CompressionContext, hf_delta.DeltaMethod) == (
        CompressedWeight, CompressionContext, DeltaMethod)
    assert issubclass(hf_delta.BaseModelMismatchError, ValueError)
    assert issubclass(hf_delta.DeltaNotFoundError, KeyError)
    assert "bitdelta" in hf_delta.registered_methods()


@pytest.mark.parametrize(("old", "new"), [("hf_delta._loading", "hf_delta.utils.loading"),
                                          ("hf_delta._io", "hf_delta.utils.io")])
def test_old_module_paths_still_import_with_a_deprecation_warning(old, new):
    code = (f"import warnings, importlib; warnings.simplefilter('error')\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print(w)\n"
            f"warnings.simplefilter('ignore'); import {old} as a, {new} as b; print(a is b)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    message, same = done.stdout.strip().splitlines()
    assert f"{old} is deprecated" in message and f"use {new}" in message
    assert same == "True"


def test_export_peft_lora_from_its_old_place_warns_and_is_the_same_function():
    import importlib

    methods = importlib.import_module("hf_delta.methods")
    vars(methods).pop("export_peft_lora", None)
    with pytest.warns(DeprecationWarning, match="hf_delta.methods.export_peft_lora is deprecated"):
        old = methods.export_peft_lora
    assert old is hf_delta.export_peft_lora
