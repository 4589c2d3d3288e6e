"""DeltaZip: the OBS/GPTQ solver against a plain reference, storage layouts, compression on the micro zoo."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_delta import DeltaModel, compress
from hf_delta.errors import CalibrationError, DeltaConfigError
from hf_delta.evaluation import mean_kl
from hf_delta.methods import DeltaZipConfig, DeltaZipWeight
from hf_delta.methods.deltazip import inverse_hessian_factor, prune_quantize
from hf_delta.methods.deltazip.calibrate import LayerCalibrator
from hf_delta.storage import Delta
from hf_delta.utils.loading import load_model
from hf_delta.utils.sizes import bf16_weight_bytes, folder_bytes


def _problem(out: int = 8, k: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight, correlated inputs (so the Hessian matters) and their Hessian 2XᵀX/n."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, k, generator=g)
    x = torch.randn(256, k, generator=g) @ (torch.eye(k) + 0.6 * torch.randn(k, k, generator=g))
    return w, x, 2 * x.T @ x / len(x)


def _output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum())


# ===================================================================================================
# The solver
# ===================================================================================================


def _reference(w, h, *, bits, group_size, two_four, damp):
    """OBS one column at a time with the exact inverse of the remaining Hessian, no blocks, no Cholesky."""
    w = w.double().clone()
    h = h.double().clone()
    k = w.shape[1]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.zeros_like(w)
    keep = torch.ones_like(w, dtype=torch.bool)
    group = group_size or k
    scale = None
    for j in range(k):
        hinv = torch.linalg.inv(h[j:, j:])  # inverse Hessian of the columns not yet fixed
        if j % group == 0:
            s = w[:, j : j + group].abs().amax(1) / (hi + 0.5)
            scale = s.to(torch.float16).double()
        if two_four and j % 4 == 0:
            # SparseGPT's saliency: column i's OBS diagonal once the columns before it are fixed.
            d = torch.stack([torch.linalg.inv(h[i:, i:])[0, 0] for i in range(j, j + 4)])
            sal = w[:, j : j + 4] ** 2 / d
            drop = sal.topk(2, dim=1, largest=False).indices
            keep[:, j : j + 4] = torch.ones(w.shape[0], 4, dtype=torch.bool).scatter_(1, drop, False)
        q[:, j] = (w[:, j] / scale).round().clamp(lo, hi) * keep[:, j]
        err = (w[:, j] - q[:, j] * scale) / hinv[0, 0]
        w[:, j:] -= err.unsqueeze(1) * hinv[0].unsqueeze(0)
    return q


@pytest.mark.parametrize(("bits", "group_size", "sparsity"), [(4, None, None), (3, 4, None), (4, None, "2:4"),
                                                              (2, 8, "2:4")])
def test_blocked_solver_matches_per_column_reference(bits, group_size, sparsity):
    w, _, h = _problem()
    want = _reference(w, h, bits=bits, group_size=group_size, two_four=sparsity == "2:4", damp=0.01)
    for block in (4, 8, 128):  # lazy block updates must not change the result
        got = prune_quantize(w, h, bits=bits, group_size=group_size, sparsity=sparsity, block_size=block)
        assert torch.equal(got.q.double(), want), f"block_size={block}"


def test_obs_error_formula_is_the_least_squares_compensation():
    """Fixing column 0 at q0, the update e·U[0, 1:] equals the best re-fit of the other columns."""
    w, x, h = _problem(out=1, k=6)
    u = inverse_hessian_factor(h, w.clone(), damp=1e-9)
    q0 = torch.round(w[0, 0] * 2) / 2
    e = (w[0, 0] - q0) / u[0, 0]
    update = -e * u[0, 1:]
    # argmin_r ||X[:, 0] q0 + X[:, 1:] r - X w|| over the remaining columns r, solved directly:
    target = x @ w[0] - x[:, 0] * q0
    best = torch.linalg.lstsq(x[:, 1:].double(), target.double().unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(w[0, 1:] + update, best.float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("sparsity", [None, "2:4", 0.5])
def test_compensation_beats_round_to_nearest(sparsity):
    w, x, h = _problem(out=32, k=64)
    gptq = prune_quantize(w, h, bits=4, sparsity=sparsity, block_size=16)
    rtn = prune_quantize(w, None, bits=4, sparsity=sparsity)
    assert _output_error(x, w, gptq.dequantize()) < 0.7 * _output_error(x, w, rtn.dequantize())
    if sparsity is not None:
        assert gptq.keep.float().mean() == pytest.approx(0.5)
        magnitude = prune_quantize(w, h, bits=4, sparsity=sparsity, prune="magnitude", block_size=16)
        assert _output_error(x, w, gptq.dequantize()) < _output_error(x, w, magnitude.dequantize())


# ===================================================================================================
# Storage layouts
# ===================================================================================================


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("sparsity", "group_size", "zero_rows"), [(None, None, False), ("2:4", None, True),
                                                                   ("2:4", 8, False), (0.7, 16, True)])
def test_weight_layouts_round_trip(bits, sparsity, group_size, zero_rows):
    w, _, h = _problem(out=12, k=32, seed=bits)
    if zero_rows:  # like an embedding delta: rows of tokens the fine-tune never saw are exactly zero
        w[[0, 2, 3, 7, 8, 9, 11]] = 0
    qm = prune_quantize(w, h, bits=bits, group_size=group_size, sparsity=sparsity, block_size=16)
    layout = {None: "dense", "2:4": "2:4"}.get(sparsity, "bitmap")
    weight = DeltaZipWeight.from_quantized(qm.q, qm.scales, qm.keep, bits=bits, group_size=group_size, layout=layout)
    assert weight.meta()["row_index"] == zero_rows
    dense = qm.dequantize()
    assert torch.equal(weight.to_dense(), dense)
    for idx in (torch.tensor([[3, 0], [11, 3]]), torch.tensor([0, 2]), torch.tensor([], dtype=torch.long)):
        assert torch.equal(weight.rows(idx), dense[idx])
    x = torch.randn(5, 32)
    torch.testing.assert_close(weight.apply(x), x @ dense.T, rtol=1e-5, atol=1e-5)
    again = DeltaZipWeight.from_tensors(dict(weight.named_buffers()), weight.meta())
    assert torch.equal(again.to_dense(), dense)
    saved, meta = weight.saved_tensors()  # the disk encoding: compact 2:4 masks, everything else as in memory
    assert (meta.get("mask_encoding") == "2of4-compact") == (layout == "2:4")
    from_disk = DeltaZipWeight.from_tensors(saved, meta)
    assert all(torch.equal(t, dict(from_disk.named_buffers())[b]) for b, t in weight.named_buffers())
    assert weight.scales.dtype == torch.float16


def test_two_of_four_keeps_exactly_two_per_group_and_halves_the_values():
    g = torch.Generator().manual_seed(1)
    # |values| in [0.5, 1]: a kept value never rounds to 0 at 8 bits, so nonzeros = kept positions.
    w = (torch.rand(16, 64, generator=g) * 0.5 + 0.5) * torch.randn(16, 64, generator=g).sign()
    _, _, h = _problem(out=16, k=64)
    qm = prune_quantize(w, h, bits=8, sparsity="2:4", block_size=32)
    weight = DeltaZipWeight.from_quantized(qm.q, qm.scales, qm.keep, bits=8, group_size=None, layout="2:4")
    nonzero = (weight.to_dense() != 0).reshape(16, 16, 4).sum(-1)
    assert bool((nonzero == 2).all())
    assert weight.qweight.shape == (16, 32)  # 8 bits x half the columns
    assert weight.mask.shape == (16, 8)  # 2 bits x 2 positions per group of 4
    dense = DeltaZipWeight.from_quantized(qm.q, qm.scales, None, bits=8, group_size=None, layout="dense")
    assert weight.nbytes() < 0.7 * dense.nbytes()


# ===================================================================================================
# Layer-by-layer calibration
# ===================================================================================================


def _full_forward_hessian(model, name, batches):
    """2XᵀX/n of the real tokens reaching ``name``, from plain forward passes of the whole model."""
    rows = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: rows.append(args[0]))
    try:
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        handle.remove()
    x = torch.cat([r[mask.bool()] for r, (_, mask) in zip(rows, batches, strict=True)])
    return 2 * x.T @ x / len(x)


def test_calibrator_replays_layers_like_full_forwards(micro_zoo):
    """Hessians from cached layer inputs equal full forward passes of the partly modified model."""
    base = load_model(micro_zoo["llama-base"].path).eval()
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batches = [(ids, mask), (ids[:, :5], mask[:, :5])]
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    calibrator = LayerCalibrator(base, batches, [*targets, "lm_head"])
    groups = calibrator.groups()
    assert groups[:4] == [[f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], ["model.layers.0.self_attn.o_proj"],
                          ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
                          ["model.layers.0.mlp.down_proj"]]
    assert groups[-1] == ["lm_head"]
    seen = []

    def each_group(names, hessians):
        for name in names:
            torch.testing.assert_close(hessians[name], _full_forward_hessian(base, name, batches), rtol=1e-4, atol=1e-5)
            base.get_submodule(name).weight.data.mul_(0.5)  # later groups must see this change
            seen.append(name)

    with torch.no_grad():
        calibrator.run(each_group, progress=False)
    assert seen == [n for g in groups for n in g]


# ===================================================================================================
# Compression on the micro zoo
# ===================================================================================================


@pytest.mark.parametrize(("name", "options"), [("llama-arith", {"bits": 4}),
                                               ("qwen2-arith", {"bits": 3, "group_size": 16, "sparsity": 0.6})])
def test_compress_save_load_round_trip(micro_zoo, zoo_models, zoo_texts, tmp_path, name, options):
    base, ft, tok = zoo_models(name)
    entry = micro_zoo[name]
    config = DeltaZipConfig(**options)
    model = compress(micro_zoo[entry.base].path, entry.path, config, zoo_texts(name, 32), progress=False)
    model.save_pretrained(tmp_path)
    loaded = Delta.from_folder(tmp_path)
    assert loaded.config.bits == options["bits"] and loaded.config.sparsity == config.sparsity
    for module, w in model.get_delta("default").weights.items():
        assert torch.equal(loaded.weights[module].to_dense(), w.to_dense()), module
    again = DeltaModel.from_pretrained(micro_zoo[entry.base].path, tmp_path)
    task = micro_zoo.task(name)
    kl_compressed = mean_kl(ft, again, tok, task)
    assert kl_compressed < 0.1 * mean_kl(ft, base, tok, task)
    assert folder_bytes(tmp_path)["weights"] < bf16_weight_bytes(ft) / 2


def _spy_solver(monkeypatch) -> list[dict]:
    """Record what ``prune_quantize`` is asked to do for each matrix."""
    module = importlib.import_module("hf_delta.methods.deltazip")
    real, calls = module.prune_quantize, []

    def spy(w, hessian, **kwargs):
        calls.append({"shape": tuple(w.shape), "hessian": hessian, **kwargs})
        return real(w, hessian, **kwargs)

    monkeypatch.setattr(module, "prune_quantize", spy)
    return calls


def test_tied_vocabulary_matrix_is_calibrated_as_the_output_head(micro_zoo, zoo_models, zoo_texts, tmp_path,
                                                                 monkeypatch):
    base, ft, tok = zoo_models("qwen2-arith")
    entry = micro_zoo["qwen2-arith"]
    calls = _spy_solver(monkeypatch)
    config = DeltaZipConfig(bits=4, sparsity="2:4", embedding_method="gptq", embedding_bits=None, head_bits=2)
    model = compress(micro_zoo[entry.base].path, entry.path, config, zoo_texts("qwen2-arith", 32), progress=False)
    delta = model.get_delta("default")
    assert delta.tied == {"lm_head": "model.embed_tokens"}
    vocab = delta.weights["model.embed_tokens"]
    assert (vocab.bits, vocab.layout) == (2, "2:4")
    (call,) = [c for c in calls if c["shape"] == vocab.shape]
    hidden = ft.config.hidden_size
    assert call["sparsity"] == "2:4" and call["hessian"] is not None and call["hessian"].shape == (hidden, hidden)
    # The head's input Hessian is the last one computed: the tied matrix is compressed after every decoder layer.
    assert calls[-1] is call
    assert all(c["bits"] == 4 for c in calls if c is not call)
    model.save_pretrained(tmp_path)
    again = DeltaModel.from_pretrained(micro_zoo[entry.base].path, tmp_path)
    assert torch.equal(again.get_delta("default").weights["model.embed_tokens"].to_dense(), vocab.to_dense())
    task = micro_zoo.task("qwen2-arith")
    assert mean_kl(ft, again, tok, task) < 0.5 * mean_kl(ft, base, tok, task)


def test_head_bits_apply_to_the_head_and_embedding_bits_to_the_embedding(micro_zoo, zoo_texts, monkeypatch):
    entry = micro_zoo["llama-arith"]
    calls = _spy_solver(monkeypatch)
    config = DeltaZipConfig(bits=4, sparsity="2:4", embedding_method="gptq", embedding_bits=8, head_bits=2)
    delta = compress(micro_zoo[entry.base].path, entry.path, config, zoo_texts("llama-arith", 16),
                     progress=False).get_delta("default")
    head, embed = delta.weights["lm_head"], delta.weights["model.embed_tokens"]
    assert (head.bits, head.layout, embed.bits, embed.layout) == (2, "2:4", 8, "dense")
    by_bits = {c["bits"]: c for c in calls}
    assert by_bits[8]["hessian"] is None and by_bits[2]["hessian"] is not None  # RTN embedding, calibrated head


def test_bad_inputs_fail_before_any_work(micro_zoo, monkeypatch):
    for bad in ({"bits": 5}, {"damp": 0}, {"damp": -0.1}, {"sparsity": 1.0}, {"sparsity": "3:4"},
                {"sparsity": True}, {"group_size": 0}, {"block_size": 6}, {"embedding_method": "svd"},
                {"prune": "random"}, {"calibration_samples": 0}, {"head_bits": 1}, {"embedding_bits": 6}):
        with pytest.raises(DeltaConfigError):
            DeltaZipConfig(**bad).validate()

    def no_sampling(*args, **kwargs):
        raise AssertionError("calibration started before the config was checked")

    monkeypatch.setattr(importlib.import_module("hf_delta.methods.base"), "sample_calibration", no_sampling)
    entry = micro_zoo["llama-arith"]
    base_path = micro_zoo[entry.base].path
    with pytest.raises(DeltaConfigError, match="group_size=5 does not divide"):
        compress(base_path, entry.path, DeltaZipConfig(group_size=5), progress=False)
    with pytest.raises(CalibrationError):
        compress(base_path, entry.path, DeltaZipConfig(), [], progress=False)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=42, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    odd_base, odd_ft = LlamaForCausalLM(config), LlamaForCausalLM(config)
    with pytest.raises(DeltaConfigError, match="in_features divisible by 4"):
        compress(odd_base, odd_ft, DeltaZipConfig(sparsity="2:4"), progress=False)
    # A head calibrated like a linear layer is pruned like one, so it must fit 2:4 too (an RTN head need not).
    config = LlamaConfig(vocab_size=64, hidden_size=30, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1)
    odd_base, odd_ft = LlamaForCausalLM(config), LlamaForCausalLM(config)
    with pytest.raises(DeltaConfigError, match="divisible by 4, but 'lm_head' has 30"):
        compress(odd_base, odd_ft, DeltaZipConfig(sparsity="2:4", embedding_method="gptq",
                                                  target_modules=["down_proj"]), progress=False)


@pytest.mark.parametrize("group_size", [None, 8])
def test_round_to_nearest_in_row_chunks_equals_the_whole_matrix(monkeypatch, group_size):
    import hf_delta.methods.deltazip as deltazip

    config = DeltaZipConfig(bits=4, embedding_bits=4, group_size=group_size)
    delta = torch.randn(37, 16, generator=torch.Generator().manual_seed(0)) * 1e-3
    whole = prune_quantize(delta, None, bits=4, group_size=group_size)
    monkeypatch.setattr(deltazip, "_CHUNK_VALUES", 5 * 16 + 3)  # 5 rows a chunk, the last one short
    weight, dequantized = deltazip.quantize_delta(config, delta, None, vocab=True, head=False, as_linear=False)
    torch.testing.assert_close(dequantized, whole.dequantize(), rtol=0, atol=0)
    torch.testing.assert_close(weight.to_dense(), whole.dequantize(), rtol=0, atol=0)
