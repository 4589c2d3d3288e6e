"""compress(): the caller's config is never modified, and each delta owns its settings and its record."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_delta import BitDeltaConfig, CompressionRecord, DeltaModel, compress
from hf_delta.errors import BaseModelMismatchError

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_one_config_against_two_bases_gives_two_deltas_that_each_fit_only_their_base(micro_zoo, tmp_path):
    # Two bases of one architecture: the zoo's Llama base, and its facts fine-tune taken as a base.
    bases = {"base": micro_zoo["llama-base"].path, "facts": micro_zoo["llama-facts"].path}
    config = BitDeltaConfig(distill_steps=0)
    settings = config.to_dict()
    for name, base in bases.items():
        compress(base, micro_zoo["llama-arith"].path, config, progress=False).save_pretrained(tmp_path / name)
        assert config.to_dict() == settings  # nothing recorded into the caller's object
    assert not any(hasattr(config, f) for f in CompressionRecord.__dataclass_fields__)

    for name, base in bases.items():
        other = next(b for n, b in bases.items() if n != name)
        model = DeltaModel.from_pretrained(base, tmp_path / name)
        assert model.get_delta("default").record.base_model_name_or_path == str(base)
        assert model.get_delta("default").config is not config
        with pytest.raises(BaseModelMismatchError, match="its weights differ"):
            DeltaModel.from_pretrained(other, tmp_path / name)


def test_a_delta_keeps_its_settings_when_the_callers_config_changes(micro_zoo):
    config = BitDeltaConfig(distill_steps=0, scale="row")
    model = compress(micro_zoo["llama-base"].path, micro_zoo["llama-arith"].path, config, progress=False)
    config.scale = "matrix"
    assert model.get_delta("default").config.scale == "row"


def test_the_record_says_where_the_base_came_from(micro_zoo):
    base = AutoModelForCausalLM.from_pretrained(micro_zoo["llama-base"].path, dtype=torch.float32)
    model = compress(base, micro_zoo["llama-arith"].path, BitDeltaConfig(distill_steps=0), progress=False)
    record = model.get_delta("default").record
    assert record.base_model_name_or_path == base.config._name_or_path
    assert record.base_fingerprint["layout"] and record.library_version
