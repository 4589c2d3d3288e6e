"""Mixed batches through the layers' resident slot buffers and the Triton kernels (interpreted on CPU here,
compiled on a GPU): the kernel gets the buffer itself and a slot per row, built once per forward pass, no
stacked copy of the deltas is made, and every row equals the same row run alone and the dense reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import TRITON_DEVICES
from torch import nn

import hf_delta.kernels
from hf_delta.layers import DeltaLinear, DeltaParts, DeltaRouting
from hf_delta.methods.bitdelta import BitDeltaWeight
from hf_delta.methods.deltazip import DeltaZipWeight

pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="needs CUDA or the Triton interpreter")

N, K = 48, 64


def _deltazip(g: torch.Generator, layout: str, group_size: int | None) -> DeltaZipWeight:
    """A random 4-bit DeltaZip weight ``[N, K]`` packed by the library (2:4: two kept values per four)."""
    q = torch.randint(-8, 8, (N, K), generator=g)
    keep = None
    if layout == "2:4":
        order = torch.rand(N, K // 4, 4, generator=g).argsort(-1)[..., :2]
        keep = torch.zeros(N, K // 4, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(N, K)
        q = q * keep
    groups = 1 if group_size is None else K // group_size
    scales = (torch.rand(N, groups, generator=g) * 1e-2 + 1e-3).half()
    return DeltaZipWeight.from_quantized(q, scales, keep, bits=4, group_size=group_size, layout=layout)


SLOTS = [0, 1, -1, 2, 0, 1, 1, -1, 2, 0]  # three deltas and base rows, interleaved
FORMATS = {  # name -> (kernel, a weight of that format from a generator)
    "bitdelta-1pass": (
        "bitdelta_matmul",
        lambda g: BitDeltaWeight.from_delta(torch.randn(N, K, generator=g) / 50, per_row=True),
    ),
    "bitdelta-2pass": (
        "bitdelta_matmul",
        lambda g: BitDeltaWeight.from_delta(torch.randn(N, K, generator=g) / 50, per_row=True, passes=2),
    ),
    "deltazip-4bit": ("deltazip_matmul", lambda g: _deltazip(g, "dense", 32)),
    "deltazip-4bit-2:4": ("deltazip_matmul", lambda g: _deltazip(g, "2:4", None)),
}


@pytest.fixture
def kernels_on(monkeypatch) -> torch.device:
    """The device the kernels run on; on CPU, ``HF_DELTA_KERNELS=triton`` sends the layers to the interpreter."""
    device = torch.device(TRITON_DEVICES[0])
    if device.type == "cpu":
        monkeypatch.setenv("HF_DELTA_KERNELS", "triton")
    return device


def _layers(fmt: str, routing: DeltaRouting, count: int, device: torch.device) -> list[DeltaLinear]:
    """``count`` layers sharing ``routing``, each holding deltas ``d0..d2`` of format ``fmt``."""
    gen = torch.Generator().manual_seed(0)
    layers = [DeltaLinear(nn.Linear(K, N), routing) for _ in range(count)]
    for name in ("d0", "d1", "d2"):
        slot = routing.slot_of(name) if name in routing.slots else routing.add(name)
        for layer in layers:
            layer.attach(name, DeltaParts(weight=FORMATS[fmt][1](gen)), slot)
    return [layer.to(device) for layer in layers]


def _spy(monkeypatch, op: str) -> list[torch.Tensor]:
    """The packed tensor each call of ``hf_delta.kernels.<op>`` got (the layers look the op up per call)."""
    seen: list[torch.Tensor] = []
    real = getattr(hf_delta.kernels, op)

    def spy(x, out, slots, packed, *args, **kwargs):
        seen.append(packed)
        return real(x, out, slots, packed, *args, **kwargs)

    monkeypatch.setattr(hf_delta.kernels, op, spy)
    return seen


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_mixed_batch_reads_the_resident_buffer_and_equals_each_row_alone(fmt, kernels_on, monkeypatch):
    routing = DeltaRouting()
    (layer,) = _layers(fmt, routing, 1, kernels_on)
    x = torch.randn(len(SLOTS), K, generator=torch.Generator().manual_seed(1)).to(kernels_on)
    launched = _spy(monkeypatch, FORMATS[fmt][0])
    buffer = layer.resident_buffer("d0")
    with torch.no_grad(), routing.use(torch.tensor(SLOTS, device=kernels_on)):
        mixed = layer(x)
    assert len(launched) == 1 and launched[0] is buffer.tensors[next(iter(buffer.tensors))]  # the buffer itself
    with torch.no_grad():
        for row, slot in enumerate(SLOTS):
            routing.active = None if slot < 0 else f"d{slot}"  # this row alone: the per-delta path
            alone = layer(x[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-5, atol=1e-5)
            dense = layer.base_layer(x[row : row + 1]).double()
            if slot >= 0:
                dense += x[row : row + 1].double() @ layer.deltas[f"d{slot}"].weight.to_dense(torch.float64).T
            torch.testing.assert_close(mixed[row : row + 1].double(), dense, rtol=1e-4, atol=1e-5)


def test_a_forward_pass_stacks_no_deltas_and_plans_once_for_every_layer(kernels_on, monkeypatch):
    routing = DeltaRouting()
    layers = _layers("bitdelta-1pass", routing, 2, kernels_on) + _layers("deltazip-4bit-2:4", routing, 2, kernels_on)
    x = torch.randn(len(SLOTS), K, generator=torch.Generator().manual_seed(2)).to(kernels_on)
    plans = []
    real_plan = hf_delta.kernels.plan_bitdelta_batch
    monkeypatch.setattr(hf_delta.kernels, "plan_bitdelta_batch", lambda *a, **k: plans.append(1) or real_plan(*a, **k))

    def no_copies(*args, **kwargs):
        raise AssertionError("a delta layer's forward stacked or concatenated tensors")

    with torch.no_grad(), routing.use(torch.tensor(SLOTS, device=kernels_on)):
        # Every layer holds d0..d2 in its slots 0..2: one slot vector and plan serve all four.
        expected = [layer(x) for layer in layers[:1]]
        with monkeypatch.context() as no_stack:
            no_stack.setattr(torch, "stack", no_copies)
            no_stack.setattr(torch, "cat", no_copies)
            got = [layer(x) for layer in layers]
    assert len(plans) == 1
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
