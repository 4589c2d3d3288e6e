"""BitDelta: sign/scale maths, packing of any width, and scale distillation."""

from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from hf_delta import BitDeltaConfig, CompressionContext, DeltaModel, compress
from hf_delta.errors import DeltaConfigError
from hf_delta.extract import extract_delta
from hf_delta.methods.bitdelta import BitDeltaWeight, compress_bitdelta, distill_scales
from hf_delta.packing import unpack_signs
from hf_delta.storage import Delta

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _hand_signs(delta: torch.Tensor) -> torch.Tensor:
    """±1 per element, +1 for zeros (the packed bit is "is non-negative")."""
    return torch.tensor([[1.0 if v >= 0 else -1.0 for v in row] for row in delta.tolist()])


def _hand_unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bit k % 8 of byte k // 8, set = +1 (packing.py's documented layout), decoded with Python ints."""
    rows = []
    for row in packed.tolist():
        rows.append([1.0 if (row[k // 8] >> (k % 8)) & 1 else -1.0 for k in range(in_features)])
    return torch.tensor(rows)


@pytest.fixture
def delta() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(6, 13, generator=g) * torch.linspace(0.1, 2.0, 6).unsqueeze(1)  # rows of different scale
    d[0, 0] = 0.0
    return d


# ----------------------------------------------------------------------------------------- sign + scale
def test_per_matrix_scale_is_mean_abs_delta(delta):
    w = BitDeltaWeight.from_delta(delta)
    scale = sum(abs(v) for row in delta.tolist() for v in row) / delta.numel()
    assert w.signs.shape == (1, 6, 2) and w.signs.dtype == torch.uint8
    assert w.scales.shape == (1, 1)
    assert w.scales.item() == pytest.approx(scale, rel=1e-6)
    assert torch.equal(_hand_unpack(w.signs[0], 13), _hand_signs(delta))
    torch.testing.assert_close(w.to_dense(), scale * _hand_signs(delta), rtol=1e-6, atol=0)


def test_per_row_scale_is_mean_abs_of_each_row(delta):
    w = BitDeltaWeight.from_delta(delta, per_row=True)
    scales = torch.tensor([sum(abs(v) for v in row) / len(row) for row in delta.tolist()])
    assert w.scales.shape == (1, 6)
    torch.testing.assert_close(w.scales[0], scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(w.to_dense(), scales.unsqueeze(1) * _hand_signs(delta), rtol=1e-6, atol=0)
    # Per-row scales fit rows of different magnitude better than one scale for the matrix.
    err_row = (delta - w.to_dense()).norm()
    err_matrix = (delta - BitDeltaWeight.from_delta(delta).to_dense()).norm()
    assert err_row < 0.9 * err_matrix


@pytest.mark.parametrize("per_row", [False, True])
def test_residual_passes_fit_what_the_previous_pass_left(delta, per_row):
    errors = []
    for passes in (1, 2, 3):
        w = BitDeltaWeight.from_delta(delta, per_row=per_row, passes=passes)
        assert w.signs.shape[0] == w.scales.shape[0] == passes
        errors.append((delta - w.to_dense()).norm().item())
    assert errors[1] < 0.9 * errors[0] and errors[2] < 0.9 * errors[1], errors
    # Pass 2 is plain BitDelta of the residual of pass 1.
    first = BitDeltaWeight.from_delta(delta, per_row=per_row).to_dense()
    second = BitDeltaWeight.from_delta(delta - first, per_row=per_row)
    two = BitDeltaWeight.from_delta(delta, per_row=per_row, passes=2)
    torch.testing.assert_close(two.scales[1], second.scales[0])
    assert torch.equal(two.signs[1], second.signs[0])


@pytest.mark.parametrize("in_features", [1, 7, 8, 9, 13, 17, 64])
@pytest.mark.parametrize("per_row", [False, True])
def test_any_in_features_packs_and_applies(in_features, per_row):
    g = torch.Generator().manual_seed(in_features)
    d = torch.randn(5, in_features, generator=g)
    w = BitDeltaWeight.from_delta(d, per_row=per_row, passes=2)
    assert w.signs.shape == (2, 5, (in_features + 7) // 8)
    dense = w.to_dense()
    hand = sum(w.scales[p].unsqueeze(1) * _hand_unpack(w.signs[p], in_features) for p in range(2))
    torch.testing.assert_close(dense, hand, rtol=1e-6, atol=1e-7)
    x = torch.randn(3, 4, in_features, generator=g)
    torch.testing.assert_close(w.apply(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    idx = torch.tensor([[4, 0], [2, 2]])
    torch.testing.assert_close(w.rows(idx), dense[idx], rtol=1e-6, atol=1e-7)
    # the padding bits of the last byte are clear and ignored
    if in_features % 8:
        assert int(w.signs[..., -1].max()) < (1 << (in_features % 8))
    again = BitDeltaWeight.from_tensors(dict(w.named_buffers()), w.meta())
    assert torch.equal(again.to_dense(), dense)


def test_config_validation():
    with pytest.raises(DeltaConfigError, match="'matrix' or 'row'"):
        BitDeltaConfig(scale="column").validate()
    with pytest.raises(DeltaConfigError):
        BitDeltaConfig(residual_passes=-1).validate()
    with pytest.raises(DeltaConfigError, match="distill_lr"):
        BitDeltaConfig(distill_lr=0).validate()


# ------------------------------------------------------------------------------------- scale distillation
class _Context(CompressionContext):
    """A CompressionContext whose calibration batches are given (and whose requests for them are recorded)."""

    def __init__(self, finetuned, config: BitDeltaConfig, batches: list, extracted=None):
        super().__init__(None, finetuned, None, extracted, config, None, progress=False)
        self.batches, self.calls = batches, []

    def calibration(self, **kwargs):
        self.calls.append(kwargs)
        return self.batches


@pytest.fixture(scope="module")
def pair(micro_zoo):
    from transformers import AutoModelForCausalLM

    load = lambda n: AutoModelForCausalLM.from_pretrained(micro_zoo[n].path, dtype=torch.float32)  # noqa: E731
    return load("llama-base"), load("llama-arith")


def _student(pair, config: BitDeltaConfig, batches) -> tuple[DeltaModel, _Context]:
    base, ft = pair
    extracted = extract_delta(base, ft)
    ctx = _Context(ft, config, batches, extracted)
    weights = compress_bitdelta(ctx)
    delta = Delta(config=config, weights=weights, exact=extracted.exact, new_rows=extracted.new_rows,
                  vocab_size=extracted.vocab_size)
    model = DeltaModel(base)
    model.add_delta("default", delta)
    return model, ctx


def _batch(rows: list[list[int]], width: int, extra_rows: int = 0, pad: int = 1):
    ids = torch.full((len(rows) + extra_rows, width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


_ROWS = [[0, 17, 45, 99, 23, 7, 81, 5, 63], [0, 44, 8, 12, 200], [0, 5, 5, 99, 150, 31, 7]]


def _distill(pair, batches, steps=4, lr=1e-3):
    config = BitDeltaConfig(distill_steps=steps, distill_lr=lr, distill_samples=3, distill_seq_len=16)
    model, ctx = _student(pair, config, batches)
    try:
        losses = distill_scales(model, ctx)
        scales = {m: w.scales.clone() for m, w in model.get_delta("default").weights.items()}
    finally:
        model.unload()
    return losses, scales, model


def test_distillation_trains_only_the_scales(pair):
    base, _ = pair
    before = {k: v.clone() for k, v in base.state_dict().items()}
    config = BitDeltaConfig(distill_steps=12, distill_lr=2e-3, distill_samples=3, distill_seq_len=16)
    model, ctx = _student(pair, config, [_batch(_ROWS, 9)])
    weights = model.get_delta("default").weights
    signs = {m: w.signs.clone() for m, w in weights.items()}
    scales = {m: w.scales.clone() for m, w in weights.items()}
    try:
        losses = distill_scales(model, ctx)
        assert ctx.calls == [{"n": 3, "seq_len": 16, "batch_size": 8}]
        assert len(losses) == 12
        assert losses[-1] < 0.8 * losses[0], losses
        for m, w in weights.items():
            assert torch.equal(w.signs, signs[m])
            assert not torch.equal(w.scales, scales[m]), m
            # a plain buffer again
            assert "scales" in dict(w.named_buffers()) and not isinstance(w.scales, torch.nn.Parameter)
            assert not w.scales.requires_grad
        assert not any(p.requires_grad for p in model.parameters())
    finally:
        model.unload()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_distillation_with_zero_steps_is_a_no_op(pair):
    config = BitDeltaConfig(distill_steps=0)
    model, ctx = _student(pair, config, [])
    try:
        assert distill_scales(model, ctx) == [] and ctx.calls == []
    finally:
        model.unload()


def test_padding_does_not_change_the_loss(pair):
    tight, _, _ = _distill(pair, [_batch(_ROWS, 9)], steps=3)
    padded, scales_padded, _ = _distill(pair, [_batch(_ROWS, 14, extra_rows=2)], steps=3)
    _, scales_tight, _ = _distill(pair, [_batch(_ROWS, 9)], steps=3)
    torch.testing.assert_close(torch.tensor(padded), torch.tensor(tight), rtol=1e-5, atol=0)
    for m in scales_tight:
        torch.testing.assert_close(scales_padded[m], scales_tight[m], rtol=1e-4, atol=1e-7)


def test_loss_is_mse_of_logits_on_real_tokens(pair):
    base, ft = pair
    ids, mask = _batch(_ROWS, 11, extra_rows=1)
    losses, _, _ = _distill(pair, [(ids, mask)], steps=1)
    # Reference: the student before any step is base + decompressed delta; compute its logits densely.
    extracted = extract_delta(base, ft)
    dense = {k: v.clone() for k, v in base.state_dict().items()}
    for module, d in extracted.compress.items():
        dense[f"{module}.weight"] += BitDeltaWeight.from_delta(d, per_row=True).to_dense()  # the default scale="row"
    dense.update(extracted.exact)
    with torch.no_grad():
        student = torch.func.functional_call(base, dense, (), {"input_ids": ids, "attention_mask": mask}).logits
        teacher = ft(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    expected = ((student[real] - teacher[real]) ** 2).mean().item()
    assert losses[0] == pytest.approx(expected, rel=1e-4)


def test_compress_is_deterministic_with_a_seed(micro_zoo):
    config = dict(distill_steps=3, distill_samples=4, distill_seq_len=12, distill_batch_size=2, seed=7)
    runs = []
    for _ in range(2):
        model = compress(micro_zoo["llama-base"].path, micro_zoo["llama-arith"].path, BitDeltaConfig(**config),
                         progress=False)
        runs.append({m: w.scales for m, w in model.get_delta("default").weights.items()})
    initial = compress(micro_zoo["llama-base"].path, micro_zoo["llama-arith"].path,
                       BitDeltaConfig(**{**config, "distill_steps": 0}), progress=False)
    changed = 0
    for m, scales in runs[0].items():
        assert torch.equal(scales, runs[1][m]), m
        changed += not torch.equal(scales, initial.get_delta("default").weights[m].scales)
    assert changed == len(runs[0])  # distillation did run


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("passes", [1, 3])
def test_from_delta_in_row_chunks_equals_the_whole_matrix_and_leaves_the_input_alone(monkeypatch, per_row, passes):
    import hf_delta.methods.bitdelta as bitdelta

    delta = torch.randn(37, 29, generator=torch.Generator().manual_seed(0)) * 1e-3
    before = delta.clone()
    whole = BitDeltaWeight.from_delta(delta, per_row=per_row, passes=passes)
    monkeypatch.setattr(bitdelta, "_CHUNK_VALUES", 3 * 29 + 5)  # 3 rows a chunk, the last one short
    chunked = BitDeltaWeight.from_delta(delta, per_row=per_row, passes=passes)
    assert torch.equal(delta, before)
    assert torch.equal(chunked.signs, whole.signs)
    torch.testing.assert_close(chunked.scales, whole.scales, rtol=1e-6, atol=0)
    # the residual passes fit what the earlier ones left: each pass shrinks the error
    errors = [(delta - BitDeltaWeight(delta.shape, whole.signs[: p + 1], whole.scales[: p + 1]).to_dense()).norm()
              for p in range(passes)]
    assert all(b < a for a, b in itertools.pairwise(errors))


def test_the_sign_matmul_under_autograd_keeps_only_packed_signs_and_gives_the_same_gradients():
    gen = torch.Generator().manual_seed(0)
    weight = BitDeltaWeight.from_delta(torch.randn(24, 40, generator=gen), per_row=True, passes=2)
    weight.scales = torch.nn.Parameter(weight.scales.clone())
    x = torch.randn(5, 40, generator=gen, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = weight.apply(x)
    assert not any(t.shape == (24, 40) for t in saved)  # no dense ±1 matrix kept for the backward
    (y ** 2).sum().backward()
    # reference: the dense maths with plain autograd
    x_ref = x.detach().clone().requires_grad_()
    scales = weight.scales.detach().clone().requires_grad_()
    dense = sum(scales[p].unsqueeze(-1) * unpack_signs(weight.signs[p], 40) for p in range(2))
    ((x_ref @ dense.T) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)  # same maths, other summation order
    torch.testing.assert_close(weight.scales.grad, scales.grad, rtol=1e-4, atol=1e-4)


def test_the_sign_matmul_unpacks_a_block_of_rows_at_a_time_with_the_same_results(monkeypatch):
    """A 32000-row head is unpacked a block of rows at a time in both directions; the product and the input's
    gradient equal the whole-matrix ones (the backward sums the blocks in float32)."""
    import hf_delta.methods.bitdelta as bitdelta

    gen = torch.Generator().manual_seed(1)
    signs = BitDeltaWeight.from_delta(torch.randn(23, 40, generator=gen)).signs[0]
    x = torch.randn(3, 6, 40, generator=gen)
    dense = unpack_signs(signs, 40)
    x_ref = x.clone().requires_grad_()
    grad_out = torch.randn(3, 6, 23, generator=gen)
    (x_ref @ dense.T).backward(grad_out)
    unpacked = []
    real_unpack = bitdelta.unpack_signs
    monkeypatch.setattr(bitdelta, "unpack_signs", lambda s, *a: unpacked.append(s.shape[0]) or real_unpack(s, *a))
    monkeypatch.setattr(bitdelta, "_CHUNK_VALUES", 5 * 40)  # blocks of 5 rows: 5, 5, 5, 5, 3
    x_blocks = x.clone().requires_grad_()
    y = bitdelta._SignMatmul.apply(x_blocks, signs, 40)
    y.backward(grad_out)
    assert unpacked == [5, 5, 5, 5, 3] * 2
    torch.testing.assert_close(y, x_ref.detach() @ dense.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_blocks.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def _trainable_student(pair, batch) -> tuple[DeltaModel, list[BitDeltaWeight]]:
    """The base with the compressed delta active and its scales trainable, as distillation has them."""
    model, _ = _student(pair, BitDeltaConfig(distill_steps=1), [batch])
    weights = list(model.get_delta("default").weights.values())
    for w in weights:
        w.scales = torch.nn.Parameter(w.scales.detach().clone())
    model.set_delta("default")
    return model, weights


def test_distillation_recomputes_decoder_layers_with_the_same_gradients(pair):
    """Under ``_recomputed_layers`` a step keeps far fewer tensors for the backward (activations are recomputed
    layer by layer), gives the scales the same gradients, and leaves every layer's forward as it was."""
    from hf_delta.methods.bitdelta import _recomputed_layers

    ids, mask = _batch(_ROWS, 12)

    def step(recompute: bool):
        model, weights = _trainable_student(pair, (ids, mask))
        try:
            saved: list[int] = []
            scope = _recomputed_layers(model) if recompute else contextlib.nullcontext()
            with scope, torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                (logits**2).mean().backward()
            layers = model.base_model.get_decoder().layers
            assert all("forward" not in vars(layer) for layer in layers)  # restored: the class's forward again
            return sum(saved), [w.scales.grad.clone() for w in weights]
        finally:
            model.unload()

    kept_plain, grads_plain = step(False)
    kept_recomputed, grads_recomputed = step(True)
    assert kept_recomputed < 0.5 * kept_plain
    for a, b in zip(grads_recomputed, grads_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_distillation_loss_in_token_blocks_equals_the_whole_logits_loss(pair, monkeypatch):
    """The head and the loss run a few tokens at a time (here 4 blocks); the loss and the scales' gradients are
    those of the loss on the whole logits, and no tensor of the whole step's logits is kept for the backward."""
    import hf_delta.methods.bitdelta as bitdelta

    ids, mask = _batch(_ROWS, 12)
    real = int(mask.sum())
    model, weights = _trainable_student(pair, (ids, mask))
    try:
        vocab = model.base_model.config.vocab_size
        target = torch.randn(*ids.shape, vocab + 3, generator=torch.Generator().manual_seed(0))  # padded teacher
        path = bitdelta._head_path(model, (ids, mask))
        assert path is not None and path[2] == vocab

        def loss_and_grads(path):
            saved: list[torch.Size] = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
                loss = bitdelta._distill_loss(model, path, ids, mask, target)
            loss.backward()
            grads = [w.scales.grad.clone() for w in weights]
            for w in weights:
                w.scales.grad = None
            return loss.detach(), grads, saved

        whole, whole_grads, whole_saved = loss_and_grads(None)
        monkeypatch.setattr(bitdelta, "_CHUNK_VALUES", vocab * (real // 4 + 1))  # 4 blocks of tokens
        blocks, block_grads, saved = loss_and_grads(path)
        torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=0)
        for a, b in zip(block_grads, whole_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
        rows_of_logits = lambda shapes: [s[:-1].numel() for s in shapes if s[-1] >= vocab]  # noqa: E731
        assert max(rows_of_logits(whole_saved)) >= real  # the whole path keeps the step's logits ...
        assert max(rows_of_logits(saved)) <= real // 4 + 1  # ... the blocks only a block's (the checkpoint's input)
    finally:
        model.unload()


def test_a_model_whose_logits_are_not_its_head_on_its_decoder_keeps_the_whole_logits_loss(pair):
    """Llama's forward does not soft-cap; with a soft-cap set in its config the head path would, so the check
    on one sequence finds the mismatch and the loss runs on the model's own logits."""
    import hf_delta.methods.bitdelta as bitdelta

    model, _ = _student(pair, BitDeltaConfig(distill_steps=1), [_batch(_ROWS, 12)])
    try:
        model.set_delta("default")
        assert bitdelta._head_path(model, _batch(_ROWS, 12)) is not None
        model.base_model.config.final_logit_softcapping = 1.0
        assert bitdelta._head_path(model, _batch(_ROWS, 12)) is None
    finally:
        model.unload()
