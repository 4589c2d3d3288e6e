"""The delta-aware layers run the Triton kernel (interpreted on CPU here) and match the PyTorch path."""

from __future__ import annotations

import pytest
import torch

from hf_delta import DeltaModel
from hf_delta._loading import load_model, load_tokenizer
from hf_delta.storage import Delta


@pytest.mark.parametrize("scale", ["row", "matrix"])
def test_mixed_batch_through_the_kernel_equals_the_reference(micro_zoo, micro_delta, monkeypatch, scale):
    base_path = micro_zoo["llama-base"].path
    model = DeltaModel(load_model(base_path))
    for name in ("llama-arith", "llama-cipher"):
        model.add_delta(name, Delta.from_folder(micro_delta(name, scale=scale, residual_passes=1)))
    tok = load_tokenizer(base_path)
    batch = tok(["add 1 to 1 2 3 4 =", "encode a b c d =", "def f(x):"], return_tensors="pt", padding=True)
    names = ["llama-arith", "llama-cipher", "__base__"]
    import hf_delta.kernels

    calls = []
    real = hf_delta.kernels.bitdelta_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_delta.kernels, "bitdelta_matmul", spy)
    with torch.no_grad():
        reference = model(**batch, delta_names=names).logits
        assert not calls  # CPU tensors take the PyTorch path by default
        monkeypatch.setenv("HF_DELTA_KERNELS", "triton")
        kernel = model(**batch, delta_names=names).logits
    assert calls and set(calls) == {"triton"}
    err = (kernel - reference).abs().max() / reference.abs().max()
    assert err < 1e-5, f"max relative error {err:.2e}"
