"""NAME=REPO[@REVISION] specs: the one grammar of `hf-delta serve --delta`, `hf-delta demo` and the Space."""

from __future__ import annotations

import pytest

from hf_delta.errors import EngineConfigError
from hf_delta.utils.specs import DeltaSpec, parse_delta_specs


def test_names_repos_and_revisions(tmp_path):
    local = tmp_path / "delta@v1"  # a folder whose name has an @ stays whole
    local.mkdir()
    got = parse_delta_specs([" math = org/math-delta@v2", "chat=./chat", f"old={local}", ""])
    assert got == {"math": DeltaSpec("org/math-delta", "v2"), "chat": DeltaSpec("./chat", None),
                   "old": DeltaSpec(str(local), None)}
    assert parse_delta_specs("a=org/a, b=org/b@main") == {"a": DeltaSpec("org/a"), "b": DeltaSpec("org/b", "main")}
    assert parse_delta_specs(None) == {} == parse_delta_specs("")


@pytest.mark.parametrize(("spec", "message"), [("math", "NAME=REPO"), ("=org/x", "NAME=REPO"), ("a=", "NAME=REPO"),
                                               ("a=x,a=y", "'a' is given twice")])
def test_malformed_specs_say_what_is_expected(spec, message):
    with pytest.raises(EngineConfigError, match=message):
        parse_delta_specs(spec)
