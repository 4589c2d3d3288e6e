"""Resident slot buffers (``hf_delta.slots``) in the layers that own them: attaching writes a delta's packed
tensors into a slot (and its weight views that slot), detaching zeroes the slot and leaves the weight its
values, slots are reused, and buffers grow by doubling or hold the configured capacity from the start."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_delta import DeltaModel
from hf_delta.layers import DeltaLinear, DeltaParts, DeltaRouting
from hf_delta.methods.bitdelta import BitDeltaWeight
from hf_delta.methods.deltazip import DeltaZipWeight
from hf_delta.methods.lowrank import LowRankWeight
from hf_delta.storage import Delta

OUT, IN = 12, 16


def _bitdelta(seed: int, **kwargs) -> BitDeltaWeight:
    return BitDeltaWeight.from_delta(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)), **kwargs)


def _layer(capacity: int = 0) -> DeltaLinear:
    routing = DeltaRouting()
    routing.capacity = capacity
    return DeltaLinear(nn.Linear(IN, OUT), routing)


def _attach(layer: DeltaLinear, name: str, parts: DeltaParts) -> None:
    layer.attach(name, parts, layer.routing.add(name))


def _detach(layer: DeltaLinear, name: str) -> None:
    layer.detach(name)
    layer.routing.slots[layer.routing.slot_of(name)] = None


def _copies(weight) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in weight.named_buffers()}


def _in(buffer, weight) -> bool:
    """Whether every tensor of ``weight`` lies in ``buffer``'s memory (a view of a slot, no copy of its own)."""

    def inside(t: torch.Tensor, whole: torch.Tensor) -> bool:
        start = whole.data_ptr()
        return start <= t.data_ptr() < start + whole.numel() * whole.element_size()

    return all(inside(t, buffer.tensors[k]) for k, t in weight.named_buffers())


def test_attaching_writes_each_deltas_packed_tensors_into_a_slot_the_weight_then_views():
    layer = _layer()
    weights = {name: _bitdelta(seed, per_row=True) for seed, name in enumerate("abc")}
    originals = {name: _copies(w) for name, w in weights.items()}
    for name, w in weights.items():
        _attach(layer, name, DeltaParts(weight=w))
    buffer = layer.resident_buffer("a")
    assert all(layer.resident_buffer(n) is buffer for n in "abc")  # one format, one buffer
    assert buffer.capacity == 4  # 1 -> 2 -> 4: doubled, not grown per attach
    assert sorted(buffer.slot_of(n) for n in "abc") == [0, 1, 2]
    for name, w in weights.items():
        slot = buffer.slot_of(name)
        for key, value in originals[name].items():
            assert torch.equal(buffer.tensors[key][slot], value), (name, key)
            assert torch.equal(getattr(w, key), value)
        assert _in(buffer, w)
    assert not buffer.tensors["signs"][3].any() and not buffer.tensors["scales"][3].any()  # the free slot


def test_detaching_zeroes_the_slot_the_weight_keeps_its_values_and_the_slot_is_reused():
    layer = _layer()
    a, b, c = (_bitdelta(seed) for seed in range(3))
    kept_a, kept_c = _copies(a), _copies(c)
    _attach(layer, "a", DeltaParts(weight=a))
    _attach(layer, "b", DeltaParts(weight=b))
    buffer = layer.resident_buffer("a")
    slot_a = buffer.slot_of("a")
    _detach(layer, "a")
    assert layer.resident_buffer("a") is None and "a" not in layer.deltas
    assert not buffer.tensors["signs"][slot_a].any() and not buffer.tensors["scales"][slot_a].any()
    assert not _in(buffer, a)  # a caller still holding the weight holds its own copy ...
    assert all(torch.equal(t, kept_a[k]) for k, t in a.named_buffers())  # ... with its values
    _attach(layer, "c", DeltaParts(weight=c))
    assert buffer.slot_of("c") == slot_a and buffer.capacity == 2  # the freed slot, no growth
    assert torch.equal(buffer.tensors["signs"][slot_a], kept_c["signs"])


def test_a_configured_capacity_is_allocated_at_once_and_kept_when_the_last_delta_leaves():
    layer = _layer(capacity=6)
    _attach(layer, "a", DeltaParts(weight=_bitdelta(0)))
    buffer = layer.resident_buffer("a")
    assert buffer.capacity == 6
    _detach(layer, "a")
    _attach(layer, "b", DeltaParts(weight=_bitdelta(1)))
    assert layer.resident_buffer("b") is buffer  # the same memory, not a new allocation
    unconfigured = _layer()
    _attach(unconfigured, "a", DeltaParts(weight=_bitdelta(0)))
    first = unconfigured.resident_buffer("a")
    _detach(unconfigured, "a")
    _attach(unconfigured, "b", DeltaParts(weight=_bitdelta(1)))
    assert unconfigured.resident_buffer("b") is not first  # freed with its last delta, allocated again


def test_growing_a_buffer_repoints_the_resident_weights():
    layer = _layer()
    weights = [_bitdelta(seed) for seed in range(5)]
    for i, w in enumerate(weights):
        _attach(layer, f"d{i}", DeltaParts(weight=w))
    buffer = layer.resident_buffer("d0")
    assert buffer.capacity == 8
    for i, w in enumerate(weights):
        assert _in(buffer, w) and buffer.holds(f"d{i}", w) == buffer.slot_of(f"d{i}")


def test_each_format_has_its_own_buffer_and_formats_without_one_keep_the_per_delta_path():
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-4, 4, (OUT, IN), generator=gen)
    scales = torch.rand(OUT, 1, generator=gen).half()
    few_rows = q.clone()
    few_rows[1:] = 0  # most rows zero: stored with a row index
    layer = _layer()
    parts = {
        "one-pass": DeltaParts(weight=_bitdelta(0)),
        "two-pass": DeltaParts(weight=_bitdelta(1, passes=2)),
        "per-row": DeltaParts(weight=_bitdelta(2, per_row=True)),
        "4bit": DeltaParts(
            weight=DeltaZipWeight.from_quantized(q, scales, None, bits=4, group_size=None, layout="dense")
        ),
        "3bit": DeltaParts(
            weight=DeltaZipWeight.from_quantized(q, scales, None, bits=3, group_size=None, layout="dense")
        ),
        "row-index": DeltaParts(
            weight=DeltaZipWeight.from_quantized(few_rows, scales, None, bits=4, group_size=None, layout="dense")
        ),
        "lowrank": DeltaParts(weight=LowRankWeight.from_delta(torch.randn(OUT, IN, generator=gen), rank=2)),
        "exact": DeltaParts(exact={"weight": torch.randn(OUT, IN, generator=gen)}),
    }
    assert parts["row-index"].weight._row_index is not None
    for name, p in parts.items():
        _attach(layer, name, p)
    buffers = {name: layer.resident_buffer(name) for name in parts}
    resident = ["one-pass", "two-pass", "per-row", "4bit"]
    assert all(buffers[n] is not None for n in resident)
    assert len({id(buffers[n]) for n in resident}) == len(resident)
    assert all(buffers[n] is None for n in parts if n not in resident)


def test_a_weight_whose_tensors_were_replaced_is_written_again_or_left_to_autograd():
    layer = _layer()
    a, b = _bitdelta(0, per_row=True), _bitdelta(1, per_row=True)
    _attach(layer, "a", DeltaParts(weight=a))
    _attach(layer, "b", DeltaParts(weight=b))
    buffer = layer.resident_buffer("a")
    new_scales = a.scales * 3
    a.scales = new_scales
    assert buffer.holds("a", a) == buffer.slot_of("a")  # rewritten: the buffer now has the new values
    assert torch.equal(buffer.tensors["scales"][buffer.slot_of("a")], new_scales) and _in(buffer, a)
    a.scales = nn.Parameter(a.scales.detach().clone())  # as scale distillation does
    assert buffer.holds("a", a) is None  # the per-delta path, which autograd can follow
    layer.routing.row_slots = torch.tensor([0, 1, 0, -1])
    x = torch.randn(4, IN)
    layer(x).sum().backward()
    assert a.scales.grad is not None and a.scales.grad.abs().sum() > 0


def test_deltas_attached_in_inference_mode_serve_a_forward_pass_with_gradients():
    """The engine attaches inside ``torch.inference_mode()``; co-serving then runs forward passes with gradients."""
    layer = _layer()
    weights = {name: _bitdelta(seed, per_row=True) for seed, name in enumerate("abc")}
    with torch.inference_mode():
        for name, w in weights.items():
            _attach(layer, name, DeltaParts(weight=w))
    buffer = layer.resident_buffer("a")
    assert not any(t.is_inference() for t in buffer.tensors.values())
    layer.routing.row_slots = torch.tensor([0, 1, 2, -1, 0, 1])
    x = torch.randn(6, IN, requires_grad=True)
    layer(x).sum().backward()
    expected = layer.base_layer.weight.sum(0).expand(6, IN).clone()
    for row, slot in enumerate([0, 1, 2, -1, 0, 1]):
        if slot >= 0:
            expected[row] += weights["abc"[slot]].to_dense().sum(0)
    torch.testing.assert_close(x.grad, expected)


def test_moving_or_casting_the_layer_rewrites_its_buffers():
    layer = _layer()
    weights = {name: _bitdelta(seed, per_row=True) for seed, name in enumerate("ab")}
    for name, w in weights.items():
        _attach(layer, name, DeltaParts(weight=w))
    expected = {name: w.to_dense(torch.float64) for name, w in weights.items()}
    layer.double()  # casts the base and the scales: the buffer's format changes
    buffer = layer.resident_buffer("a")
    assert buffer.tensors["scales"].dtype == torch.float64 and all(_in(buffer, w) for w in weights.values())
    layer.routing.row_slots = torch.tensor([0, 1, -1, 1])
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x)
        want = layer.base_layer(x)
    for row, name in zip([0, 1, 3], "abb", strict=True):
        want[row] += x[row] @ expected[name].T
    torch.testing.assert_close(got, want)


@pytest.mark.usefixtures("torch_one_thread")
def test_load_and_delete_delta_write_and_clear_the_layers_slots(micro_zoo, micro_delta):
    from transformers import AutoModelForCausalLM

    model = DeltaModel(AutoModelForCausalLM.from_pretrained(micro_zoo["llama-base"].path))
    on_disk = Delta.from_folder(micro_delta("llama-cipher"))
    model.load_delta(micro_delta("llama-arith"), "arith")
    model.load_delta(micro_delta("llama-cipher"), "cipher")
    layers = {name: m for name, m in model.base_model.named_modules() if isinstance(m, DeltaLinear)}
    assert layers
    for module, weight in on_disk.weights.items():
        layer = layers.get(module)
        if layer is None:  # the embedding: not a linear layer
            continue
        buffer = layer.resident_buffer("cipher")
        slot = buffer.slot_of("cipher")
        for key, value in weight.named_buffers():
            assert torch.equal(buffer.tensors[key][slot], value), (module, key)
    attached = model.get_delta("cipher")
    model.delete_delta("cipher")
    for layer in layers.values():
        buffer = layer.resident_buffer("arith")
        assert layer.resident_buffer("cipher") is None and len(buffer) == 1
        free = 1 - buffer.slot_of("arith")
        assert all(not t[free].any() for t in buffer.tensors.values())
    for module, weight in attached.weights.items():  # a caller holding the detached delta keeps its values
        for key, value in weight.named_buffers():
            assert torch.equal(value, dict(on_disk.weights[module].named_buffers())[key]), (module, key)
    model.load_delta(micro_delta("llama-facts"), "facts")
    assert all(layer.resident_buffer("facts").slot_of("facts") == free for layer in layers.values())
