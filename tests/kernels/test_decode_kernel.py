"""The format-free parts of the split-K decode path: split choice, word views, config choice and its cache,
warm-up, and an ahead-of-time sm_90 compile of the kernel. Each format's numbers against its reference are
in ``test_bitdelta_kernel.py`` / ``test_deltazip_kernel.py`` (``test_decode_kernel_*``)."""

from __future__ import annotations

import kernel_helpers as kh
import pytest
import torch

from hf_delta.kernels import (
    BitDeltaKernelConfig,
    DecodeConfig,
    _decode,
    _tuning,
    bitdelta_matmul,
    deltazip_matmul,
    plan_bitdelta_batch,
    warmup,
)
from hf_delta.packing import pack_1bit_u8, pack_lowbit_u8


@pytest.fixture
def fresh_choices(monkeypatch):
    """An empty config cache for the test (and the process's own restored after)."""
    monkeypatch.setattr(_tuning, "_CHOSEN", {})
    return _tuning._CHOSEN


def test_split_count_fills_the_sms_and_never_leaves_a_split_empty(monkeypatch):
    monkeypatch.setattr(_decode._common, "sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    # One delta on 4096 x 4096 with 32-wide N blocks: 128 output tiles want 528 / 128 -> 5 splits of the
    # 16 steps of 256; spread evenly that is 4 splits of 4 steps (5 would leave one split short).
    assert _decode.split_count(4096, 256, 128, cuda, interpret=False) == 4
    assert _decode.split_count(4096, 256, 8, cuda, interpret=False) == 16  # at most one split per step
    assert _decode.split_count(4096, 256, 16 * 128, cuda, interpret=False) == 1  # 16 deltas fill the GPU
    assert _decode.split_count(64, 256, 1, cuda, interpret=False) == 1  # one step: nothing to split
    assert _decode.split_count(4096, 256, 1, cuda, interpret=True) == 2  # fixed in the interpreter


def test_word_view_only_where_rows_and_strides_are_word_aligned():
    signs = torch.zeros(2, 1, 8, 12, dtype=torch.uint8)
    words = _decode.word_view(signs)
    assert words.dtype == torch.int32 and words.shape == (2, 1, 8, 3)
    assert _decode.word_view(torch.zeros(2, 1, 8, 13, dtype=torch.uint8)) is None  # 13 bytes a row
    assert _decode.word_view(torch.zeros(2, 1, 8, 16, dtype=torch.uint8)[..., 1:13]) is None  # offset 1


def test_decode_config_checks_its_tiles():
    with pytest.raises(ValueError, match="block_k must be a power of two >= 32"):
        DecodeConfig(block_k=16)
    with pytest.raises(ValueError, match="block_r must be a power of two"):
        DecodeConfig(block_r=3)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        DecodeConfig(split_k=0)


def test_candidates_cover_the_rows_and_stay_within_registers():
    assert [c.block_r for c in _decode.candidates(1, False)] == [1] * len(_decode.candidates(1, False))
    assert {c.block_r for c in _decode.candidates(3, False)} == {4}
    assert {c.block_r for c in _decode.candidates(16, False)} == {4}  # capped: tl.dot tiles serve more rows
    for config in _decode.candidates(4, False):
        assert config.block_r * config.block_n * config.block_k <= 64 * 32 * config.num_warps
    assert len(_decode.candidates(1, True)) == 1  # the interpreter tunes nothing


def _batch(m: int, d: int, *, k: int = 64, n: int = 32):
    x, out = torch.randn(m, k), torch.zeros(m, n)
    slots = (torch.arange(m) % d).to(torch.int32)
    return x, out, slots, plan_bitdelta_batch(slots, d)


def test_choice_is_cached_per_key_and_untuned_it_is_the_heuristic(fresh_choices):
    tile = BitDeltaKernelConfig()
    launched = []
    x, out, _, plan = _batch(1, 4)
    first = _tuning.choose_for_call(("op",), tile, x, out, plan, lambda o, c: launched.append(c), interpret=False)
    assert isinstance(first, DecodeConfig) and first.block_r == 1  # one row per delta: split-K kernel
    assert launched == []  # untuned (a CPU tensor): nothing ran
    assert list(fresh_choices) == [("op", 1, 1, x.device)]  # M bucket 1, one delta in use
    again = _tuning.choose_for_call(("op",), BitDeltaKernelConfig(block_n=64), x, out, plan, None, interpret=False)
    assert again is first  # cached by (op key, M bucket, bucket of deltas in use, device)
    x, out, _, plan = _batch(40, 2)  # 20 rows per delta: the tile kernel first
    assert _tuning.choose_for_call(("op",), tile, x, out, plan, None, interpret=False) is tile
    x, out, _, plan = _batch(300, 2)  # prefill tiles (block_m 64): always the tile default
    assert _tuning.choose_for_call(("op",), tile, x, out, plan, None, interpret=False) is tile
    assert [_tuning.m_bucket(m) for m in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_plan_counts_the_deltas_in_use_in_its_one_sync():
    assert plan_bitdelta_batch(torch.tensor([2, -1, 2, 0, 2]), 4).num_used == 2
    nothing = plan_bitdelta_batch(torch.tensor([-1, -1]), 4)
    assert nothing.num_used == 0 and not nothing.any_rows
    assert plan_bitdelta_batch(torch.zeros(0, dtype=torch.int32), 4).num_used == 0
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        plan_bitdelta_batch(torch.tensor([0, 7]), 4)


def test_autotune_only_for_compiled_kernels_on_cuda(monkeypatch):
    monkeypatch.delenv("HF_DELTA_AUTOTUNE", raising=False)  # gpu_check.sh's test phase sets it to 0
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert not _tuning.autotune_enabled(cuda, interpret=True)
    assert not _tuning.autotune_enabled(cpu, interpret=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not _tuning.autotune_enabled(cuda, interpret=False)  # no timing inside a CUDA-graph capture
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _tuning.autotune_enabled(cuda, interpret=False)
    monkeypatch.setenv("HF_DELTA_AUTOTUNE", "0")
    assert not _tuning.autotune_enabled(cuda, interpret=False)


@pytest.mark.parametrize("device", kh.TRITON_DEVICES)
def test_warmup_prepares_every_batch_size_and_leaves_nothing_behind(device, fresh_choices):
    g = torch.Generator().manual_seed(0)
    signs = pack_1bit_u8(torch.rand(3, 1, 24, 64, generator=g) < 0.5).to(device)
    scales = torch.rand(3, 1, 24, generator=g).to(device)
    calls = warmup(
        bitdelta_matmul, signs, scales, in_features=64, batch_sizes=(1, 3, 16), dtype=torch.float32, backend="triton"
    )
    assert calls == 3
    buckets = sorted(key[-3] for key in fresh_choices if key[0] == "bitdelta_matmul")
    assert buckets == [1, 4, 16]
    qweight = pack_lowbit_u8(torch.randint(-8, 8, (2, 24, 64), generator=g), 4).to(device)
    dz_scales = torch.rand(2, 24, 1, generator=g).half().to(device)
    warmup(
        deltazip_matmul,
        qweight,
        dz_scales,
        in_features=64,
        batch_sizes=(2,),
        dtype=torch.float16,
        bits=4,
        layout="dense",
        backend="triton",
    )
    assert any(key[0] == "deltazip_matmul" and key[-3] == 2 for key in fresh_choices)
    assert all(int(buf.abs().sum()) == 0 for buf in _decode._COUNTERS.values())


_AOT_LOOP = """
dec = sys.modules["_kernels_aot._decode"]
for dtype, unit_bits, bits, sparse, scale_mode, split, even, ones, cfg in cases:
    unit = "i32" if unit_bits == 32 else "u8"
    pointers = {"x_ptr": dtype, "out_ptr": dtype, "w_ptr": unit, "pos_ptr": unit,
                "scales_ptr": "fp32" if bits == 1 else "fp16", "ws_ptr": "fp32"}
    constexprs = {
        "BLOCK_R": cfg["block_r"], "BLOCK_N": cfg["block_n"], "BLOCK_K": cfg["block_k"], "USE_SPLITS": split > 1,
        "UNIT_BITS": unit_bits, "BITS": bits, "SPARSE24": sparse, "SCALE_MODE": scale_mode, "EVEN_N": even,
        "EVEN_K": even, **{name: 1 for name in ones},  # what Triton specialises when an int argument is 1
    }
    cubin = compile_sm90(dec._decode_kernel, pointers, constexprs, cfg["num_warps"], cfg["num_stages"])
    assert cubin, (dtype, unit_bits, bits, sparse, scale_mode, split, even, ones, cfg)
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the compiled kernel in the format tests")
@pytest.mark.skipif(_decode.triton is None, reason="triton not installed")
def test_decode_kernel_compiles_for_h100():
    # What the interpreter cannot check (layouts, atomics, types), for each value decoder and the fixup.
    m1 = ["M", "P", "stride_sp", "stride_sn"]  # decode at M=1, one pass, a per-matrix scale expanded
    cases = [
        ("bf16", 32, 1, False, 0, 4, True, m1, DecodeConfig(block_r=1, block_n=32, block_k=256)),
        ("fp16", 8, 1, False, 0, 1, False, [], DecodeConfig(block_r=4, block_n=16, block_k=128)),
        ("bf16", 32, 4, False, 1, 3, False, ["M", "stride_sg"], DecodeConfig(block_r=2, block_n=64, block_k=128)),
        ("fp16", 32, 2, True, 0, 2, True, ["M", "N"], DecodeConfig(block_r=1, block_n=32, block_k=256)),
        ("fp32", 8, 8, True, 2, 2, False, [], DecodeConfig(block_r=1, block_n=16, block_k=64)),
    ]
    kh.compile_for_h100(_AOT_LOOP, [(*case[:-1], vars(case[-1])) for case in cases])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 3])
def test_cuda_every_decode_candidate_matches_the_cpu_reference(m):
    # The compiled split-K kernel with every config the autotuner may pick (block_r 1 and 4), real splits.
    cases = _layer_cases(m, torch.bfloat16)
    for config in _decode.candidates(m, interpret=False):
        for run, want in cases:
            assert kh.rel_err(run(config), want) <= kh.TOLERANCES[torch.bfloat16][1], config


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autotune_times_the_candidates_once_and_keeps_a_correct_pick(monkeypatch, fresh_choices):
    monkeypatch.setenv("HF_DELTA_AUTOTUNE", "1")  # gpu_check.sh's test phase turns it off elsewhere
    for run, want in _layer_cases(2, torch.float16):
        assert kh.rel_err(run(None), want) <= kh.TOLERANCES[torch.float16][1]
    assert len(fresh_choices) == 2  # one choice per op for this (shape, M bucket, deltas in use)
    for run, want in _layer_cases(2, torch.float16):  # cached: same picks, same numbers
        assert kh.rel_err(run(None), want) <= kh.TOLERANCES[torch.float16][1]
    assert len(fresh_choices) == 2


def _layer_cases(m: int, dtype: torch.dtype):
    """``(run(config) -> out, CPU reference)`` for BitDelta and DeltaZip 4-bit at a layer-like shape with N
    and K tails (K 4000: 500 sign bytes a row, words; 2000 4-bit bytes, words)."""
    from hf_delta.kernels import bitdelta_matmul_reference, deltazip_matmul_reference

    g = torch.Generator().manual_seed(m)
    k, n, d = 4000, 1000, 4
    x, out = torch.randn(m, k, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    slots = torch.arange(m) % d
    if m > 1:
        slots[-1] = -1  # a base-only row
    signs = pack_1bit_u8(torch.rand(d, 1, n, k, generator=g) < 0.5)
    scales = 0.01 * torch.rand(d, 1, n, generator=g)
    qweight = pack_lowbit_u8(torch.randint(-8, 8, (d, n, k), generator=g), 4)
    dz_scales = (0.01 * torch.rand(d, n, 1, generator=g)).half()
    want_bd = bitdelta_matmul_reference(x, out.clone(), slots, signs, scales)
    want_dz = deltazip_matmul_reference(x, out.clone(), slots, qweight, dz_scales, bits=4, layout="dense")
    x, slots, signs, scales, qweight, dz_scales = (t.cuda() for t in (x, slots, signs, scales, qweight, dz_scales))
    return [
        (lambda config: bitdelta_matmul(x, out.cuda(), slots, signs, scales, config=config), want_bd),
        (
            lambda config: deltazip_matmul(
                x, out.cuda(), slots, qweight, dz_scales, bits=4, layout="dense", config=config
            ),
            want_dz,
        ),
    ]
