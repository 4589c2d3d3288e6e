"""The delta-aware layers run the Triton kernels (interpreted on CPU here, compiled on a GPU) and match the
PyTorch path; the deltas of one layer share a single launch when their formats stack."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES

from hf_delta import DeltaModel
from hf_delta.layers import DeltaLinear
from hf_delta.storage import Delta
from hf_delta.utils.loading import load_model, load_tokenizer

PROMPTS = ["add 1 to 1 2 3 4 =", "encode a b c d =", "def f(x):", "add 2 to 5 ="]
NAMES = ["llama-arith", "llama-cipher", "__base__", "llama-arith"]


def _spy(monkeypatch, op: str) -> list[int]:
    """Record, for each call of ``hf_delta.kernels.<op>``, how many stacked deltas it got."""
    import hf_delta.kernels

    calls: list[int] = []
    real = getattr(hf_delta.kernels, op)

    def spy(x, out, slots, stacked, *args, **kwargs):
        assert kwargs.get("backend") in ("triton", "auto")
        calls.append(stacked.shape[0])
        return real(x, out, slots, stacked, *args, **kwargs)

    monkeypatch.setattr(hf_delta.kernels, op, spy)
    return calls


def _kernel_logits(model: DeltaModel, batch, monkeypatch) -> torch.Tensor:
    """Logits with the kernels: on the GPU by default, else interpreted on CPU (``HF_DELTA_KERNELS=triton``)."""
    if TRITON_DEVICES == ["cuda"]:
        model.to("cuda")
        batch = batch.to("cuda")
    else:
        monkeypatch.setenv("HF_DELTA_KERNELS", "triton")
    with torch.no_grad():
        return model(**batch, delta_names=NAMES).logits.float().cpu()


def _layers_with(model: DeltaModel, names: list[str]) -> int:
    return sum(1 for m in model.modules() if isinstance(m, DeltaLinear) and all(n in m.deltas for n in names))


@pytest.mark.slow
@pytest.mark.parametrize(("scale", "passes"), [("row", (1, 1)), ("matrix", (1, 1)), ("row", (0, 1))])
def test_mixed_batch_through_the_bitdelta_kernel_equals_the_reference(micro_zoo, micro_delta, monkeypatch,
                                                                      torch_one_thread, scale, passes):
    if not TRITON_DEVICES:
        pytest.skip("needs CUDA or the Triton interpreter")
    base_path = micro_zoo["llama-base"].path
    model = DeltaModel(load_model(base_path).eval())
    for name, extra in zip(("llama-arith", "llama-cipher"), passes, strict=True):
        model.add_delta(name, Delta.from_folder(micro_delta(name, scale=scale, residual_passes=extra)))
    batch = load_tokenizer(base_path)(PROMPTS, return_tensors="pt", padding=True)
    calls = _spy(monkeypatch, "bitdelta_matmul")
    with torch.no_grad():
        reference = model(**batch, delta_names=NAMES).logits
    assert not calls  # CPU tensors take the PyTorch path by default
    kernel = _kernel_logits(model, batch, monkeypatch)
    both = _layers_with(model, ["llama-arith", "llama-cipher"])
    if passes[0] == passes[1]:  # one launch per layer for both deltas
        assert calls.count(2) == both and len(calls) == both
    else:  # sign passes differ: the deltas cannot stack, one launch each
        assert calls.count(1) == len(calls) == 2 * both
    err = (kernel - reference).abs().max() / reference.abs().max()
    assert err < (1e-4 if TRITON_DEVICES == ["cuda"] else 1e-5), f"max relative error {err:.2e}"


def test_mixed_batch_through_one_deltazip_launch_per_layer(micro_zoo, monkeypatch, torch_one_thread):
    """Two DeltaZip deltas of one format (4-bit 2:4) and base rows: one launch per layer, equal to the reference."""
    from hf_delta import DeltaZipConfig, compress

    if not TRITON_DEVICES:
        pytest.skip("needs CUDA or the Triton interpreter")
    base_path = micro_zoo["llama-base"].path
    model = DeltaModel(load_model(base_path).eval())
    config = DeltaZipConfig(bits=4, sparsity="2:4", use_hessian=False)  # round-to-nearest: fast
    for name in ("llama-arith", "llama-cipher"):
        model.add_delta(name, compress(base_path, micro_zoo[name].path, config, progress=False).get_delta("default"))
    batch = load_tokenizer(base_path)(PROMPTS, return_tensors="pt", padding=True)
    calls = _spy(monkeypatch, "deltazip_matmul")
    with torch.no_grad():
        reference = model(**batch, delta_names=NAMES).logits
    kernel = _kernel_logits(model, batch, monkeypatch)
    assert calls and set(calls) == {2}  # every launch carried both deltas
    err = (kernel - reference).abs().max() / reference.abs().max()
    assert err < (1e-4 if TRITON_DEVICES == ["cuda"] else 1e-5), f"max relative error {err:.2e}"
