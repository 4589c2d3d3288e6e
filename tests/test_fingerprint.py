"""Base fingerprints: the same base in any float dtype matches, a different base is a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_delta import DeltaModel
from hf_delta.errors import BaseModelMismatchError
from hf_delta.fingerprint import base_fingerprint, fingerprint_mismatch
from hf_delta.storage import Delta

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _load(micro_zoo, name: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(micro_zoo[name].path, dtype=dtype)


def test_fingerprint_is_small_deterministic_and_recorded(micro_zoo, micro_delta):
    fp = base_fingerprint(_load(micro_zoo, "llama-base"))
    assert fp == base_fingerprint(_load(micro_zoo, "llama-base"))
    assert len(json.dumps(fp)) < 4000
    assert len(fp["samples"]) == len(_load(micro_zoo, "llama-base").state_dict())  # 21 tensors: all sampled
    recorded = Delta.from_folder(micro_delta("llama-arith")).record.base_fingerprint
    assert recorded == json.loads(json.dumps(fp))


@pytest.mark.parametrize("recorded", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loaded", [torch.float32, torch.bfloat16, torch.float16])
def test_same_base_in_any_dtype_matches(micro_zoo, recorded, loaded):
    for arch in ("llama", "qwen2"):
        fp = base_fingerprint(_load(micro_zoo, f"{arch}-base", recorded))
        assert fingerprint_mismatch(fp, _load(micro_zoo, f"{arch}-base", loaded)) is None


def test_delta_loads_on_a_bf16_base(micro_zoo, micro_delta):
    folder = micro_delta("llama-arith")
    model = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, folder, dtype=torch.bfloat16)
    ref = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, folder)
    assert model.base_model.dtype == torch.bfloat16
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.no_grad():
        low, high = model(input_ids=ids).logits.float(), ref(input_ids=ids).logits
    assert (low - high).abs().max() < 0.05 * high.abs().max()


def _perturbed(micro_zoo, scale: float):
    model = _load(micro_zoo, "llama-base")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.mark.parametrize(
    ("make_base", "reason"),
    [
        (lambda z: _load(z, "qwen2-base"), "its parameter names or shapes differ"),
        (lambda z: _load(z, "llama-cipher"), "its weights differ"),  # a fine-tune is not its base
        (lambda z: _perturbed(z, 1.015), "its weights differ"),
        (lambda z: _perturbed(z, 0.985), "its weights differ"),
    ],
    ids=["other-architecture", "a-fine-tune", "scaled-up", "scaled-down"],
)
def test_different_base_is_a_clear_error(micro_zoo, micro_delta, make_base, reason):
    folder = micro_delta("llama-arith")
    base = make_base(micro_zoo)
    with pytest.raises(BaseModelMismatchError) as err:
        DeltaModel.from_pretrained(base, folder)
    message = str(err.value)
    assert reason in message and "ignore_base_mismatch=True" in message, message
    assert str(micro_zoo["llama-base"].path) in message  # names the base the delta was made for
    # The override applies it anyway.
    model = DeltaModel.from_pretrained(base, folder, ignore_base_mismatch=True)
    assert model.list_deltas() == ["default"]


def test_load_delta_on_the_wrong_base_changes_nothing(micro_zoo, micro_delta):
    model = DeltaModel(_load(micro_zoo, "qwen2-base"))
    model.load_delta(micro_delta("qwen2-arith"), "ok")
    wrapped = dict(model.named_modules())
    with pytest.raises(BaseModelMismatchError):
        model.load_delta(micro_delta("llama-arith"), "wrong")
    assert model.list_deltas() == ["ok"] and dict(model.named_modules()).keys() == wrapped.keys()
    assert all("wrong" not in getattr(m, "deltas", {}) for m in model.modules())
    model.load_delta(micro_delta("llama-arith"), "forced", ignore_base_mismatch=True)
    assert model.list_deltas() == ["ok", "forced"]


def test_delta_without_fingerprint_is_not_checked(micro_zoo, micro_delta, tmp_path):
    delta = Delta.from_folder(micro_delta("llama-arith"))
    delta.record.base_fingerprint = None
    delta.save_pretrained(tmp_path / "d")
    model = DeltaModel.from_pretrained(_load(micro_zoo, "llama-cipher"), tmp_path / "d")
    assert model.list_deltas() == ["default"]


def test_fingerprint_samples_stay_inside_tensors_over_2_24_values():
    # float32 positions of the last sample round up past the end of such tensors (a 7B model's 32000 x 4096
    # embedding crashed both fingerprinting and the check); 2**24 + 4 values is the smallest such size.
    model = torch.nn.Embedding(2**22 + 1, 4, dtype=torch.float16)
    with torch.no_grad():
        model.weight.copy_(torch.arange(model.weight.numel()).reshape(model.weight.shape) % 1000)
    fp = base_fingerprint(model)
    ((_, values),) = fp["samples"]
    assert values[-1] == float((model.weight.numel() - 1) % 1000)
    assert fingerprint_mismatch(fp, model) is None


def _tiny_valued_state() -> dict[str, torch.Tensor]:
    """Tensors like OPT's k_proj biases (~1e-5) and smaller, beside ordinary weights."""
    gen = torch.Generator().manual_seed(0)
    return {
        "layer.k_proj.bias": 1e-5 * torch.randn(32, generator=gen),
        "layer.v_proj.bias": 3e-8 * torch.randn(32, generator=gen),
        "layer.k_proj.weight": 0.02 * torch.randn(32, 32, generator=gen),
        "layer.zero.bias": torch.zeros(8),
    }


@pytest.mark.parametrize("recorded", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loaded", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_values_match_their_own_base(recorded, loaded):
    state = _tiny_valued_state()
    fp = json.loads(json.dumps(base_fingerprint({k: v.to(recorded) for k, v in state.items()})))
    assert fingerprint_mismatch(fp, {k: v.to(loaded) for k, v in state.items()}) is None
    stored = {k: v.to(recorded).float().reshape(-1).tolist() for k, v in state.items()}
    for name, values in fp["samples"]:  # recorded as they are, not rounded
        assert all(value in stored[name] for value in values), name


def test_fingerprints_rounded_to_six_decimals_still_match():
    """Deltas saved before samples kept full precision recorded ``round(value, 6)``."""
    state = _tiny_valued_state()
    fp = base_fingerprint(state)
    fp["samples"] = [[name, [round(v, 6) for v in values]] for name, values in fp["samples"]]
    assert fingerprint_mismatch(fp, state) is None


def test_tiny_values_still_tell_another_base_apart():
    state = _tiny_valued_state()
    fp = base_fingerprint(state)
    other = dict(state, **{"layer.k_proj.weight": state["layer.k_proj.weight"] * 1.02})
    assert fingerprint_mismatch(fp, other) == "its weights differ (first at layer.k_proj.weight)"
