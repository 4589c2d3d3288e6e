"""The mixed-batch 1-bit delta matmul: Triton kernel vs. its PyTorch reference vs. fp64 dense maths.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (``conftest.py`` sets
``TRITON_INTERPRET=1``); with one (``benchmarks/gpu_check.sh``) the compiled kernel runs on CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import kernel_helpers as kh
import pytest
import torch
from kernel_helpers import DTYPES, SLOT_MODES, TOLERANCES, TRITON_DEVICES, given, settings, st

import hf_delta.kernels.bitdelta as bd
from hf_delta.kernels import DecodeConfig, bitdelta_matmul, bitdelta_matmul_reference
from hf_delta.kernels.bitdelta import BitDeltaKernelConfig, plan_bitdelta_batch
from hf_delta.packing import pack_1bit_u8, unpack_signs

# Small tiles (interpreter cost grows with tile area). block_k=16 forces byte-wise sign loads;
# 32 and up read uint32 words whenever ceil(K/8) is a multiple of 4 (hypothesis draws both kinds of K).
SMALL_CONFIGS = [BitDeltaKernelConfig(**tiles) for tiles in kh.SMALL_TILES]
DECODE_CONFIGS = [DecodeConfig(**tiles) for tiles in kh.DECODE_TILES]


# ===================================================================================================
# Case construction and oracles
# ===================================================================================================


@dataclass
class Case(kh.Batch):
    signs: torch.Tensor
    scales: torch.Tensor

    def args(self) -> tuple[torch.Tensor, ...]:
        """Fresh arguments (``out`` cloned, so every call starts from the same state)."""
        return self.x, self.out.clone(), self.slots, self.signs, self.scales


def make_case(
    *,
    m: int,
    k: int,
    n: int,
    d: int = 2,
    p: int = 1,
    per_row: bool = True,
    dtype: torch.dtype = torch.float32,
    slot_mode: str = "random",
    seed: int = 0,
    device: str = "cpu",
    slot_dtype: torch.dtype = torch.int64,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    out = (0.5 * torch.randn(m, n, generator=g)).to(dtype)
    signs = pack_1bit_u8(torch.rand(d, p, n, k, generator=g) < 0.5)
    if per_row:
        scales = 0.01 + 0.1 * torch.rand(d, p, n, generator=g)
    else:  # per-matrix scale, expanded the way callers are told to (stride 0)
        scales = (0.01 + 0.1 * torch.rand(d, p, 1, generator=g)).expand(d, p, n)
    slots = kh.make_slots(slot_mode, m, d, g).to(slot_dtype)
    return Case(*(t.to(device) for t in (x, out, slots, signs, scales)))


def dense_fp64(case: Case) -> torch.Tensor:
    """``out + x @ Δ[slot]ᵀ`` with dense fp64 deltas: the oracle independent of any packing trick."""
    k = case.x.shape[1]
    x, slots = case.x.cpu().double(), case.slots.cpu().long()
    signs, scales = case.signs.cpu(), case.scales.cpu().double()
    delta = (scales[..., None] * unpack_signs(signs, k, torch.float64)).sum(1)  # [D, N, K]
    expected = case.out.cpu().double().clone()
    used = slots >= 0
    if used.any():
        expected[used] += torch.einsum("mk,mnk->mn", x[used], delta[slots[used]])
    return expected


def check(case: Case, got: torch.Tensor, *, reference: torch.Tensor | None = None) -> None:
    kh.check_result(got, case.out, case.slots, dense_fp64(case), reference=reference)


# ===================================================================================================
# Triton kernel (interpreter on CPU, compiled on CUDA)
# ===================================================================================================


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("k", "n", "config"),
    [
        (64, 32, SMALL_CONFIGS[1]),  # uint32 words, no tails: the unmasked fast path
        (60, 32, SMALL_CONFIGS[1]),  # words, K tail inside the last word (padding bits must not count)
        (40, 20, SMALL_CONFIGS[2]),  # 5 bytes per row: byte loads, N and K tails
        (64, 32, SMALL_CONFIGS[0]),  # byte loads, no tails (fp32; 16-bit activations refuse block_k 16)
    ],
)
def test_triton_sign_load_paths(device, dtype, k, n, config):
    case = make_case(m=11, k=k, n=n, d=3, p=2, dtype=dtype, seed=k + n, device=device)
    if dtype != torch.float32 and config.block_k < bd.MIN_BLOCK_K_16BIT:
        with pytest.raises(ValueError, match="block_k=16 is too small"):  # miscompiled on an H200
            bitdelta_matmul(*case.args(), backend="triton", config=config)
        return
    got = bitdelta_matmul(*case.args(), backend="triton", config=config)
    check(case, got, reference=bitdelta_matmul_reference(*case.args()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_segments_spanning_several_tiles(device, dtype):
    # 50 rows, most on one delta: that segment needs 3 tiles of 16 rows, the last one partial.
    case = make_case(m=50, k=70, n=40, d=3, p=2, dtype=dtype, slot_mode="gaps", seed=1, device=device)
    got = bitdelta_matmul(*case.args(), backend="triton", config=SMALL_CONFIGS[1])
    check(case, got, reference=bitdelta_matmul_reference(*case.args()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("m", [1, 16, 80])
def test_triton_default_config(device, m):
    # The launcher's own pick (decode vs. prefill tiles on GPU); K and N off any block multiple.
    k, n = (200, 72) if device == "cpu" else (1000, 600)
    case = make_case(m=m, k=k, n=n, d=5, p=1, dtype=torch.float16, seed=m, device=device)
    got = bitdelta_matmul(*case.args(), backend="triton")
    check(case, got, reference=bitdelta_matmul_reference(*case.args()))


# Split-K decode kernel: every batch size of the brief, 1 and 2 passes, both sign-load paths, N/K tails.
@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_decode_kernel_matches_reference(device, p, m):
    dtype = DTYPES[(m + p) % len(DTYPES)]
    # K 100: 13 bytes a row (byte loads, K tail); K 96: 3 words (word loads); N 20 and 40 end mid-tile.
    for k, n, config in ((100, 20, DECODE_CONFIGS[1]), (96, 40, DECODE_CONFIGS[2]), (70, 24, DECODE_CONFIGS[0])):
        case = make_case(m=m, k=k, n=n, d=3, p=p, dtype=dtype, seed=m * k + p, device=device)
        got = bitdelta_matmul(*case.args(), backend="triton", config=config)
        check(case, got, reference=bitdelta_matmul_reference(*case.args()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_decode_kernel_is_deterministic_and_leaves_its_counters_at_zero(device):
    from hf_delta.kernels import _decode

    case = make_case(m=7, k=256, n=48, d=4, p=1, dtype=torch.float32, seed=9, device=device)
    config = DecodeConfig(block_r=2, block_n=16, block_k=32, split_k=5, num_warps=1, num_stages=1)
    first = bitdelta_matmul(*case.args(), backend="triton", config=config)
    second = bitdelta_matmul(*case.args(), backend="triton", config=config)
    assert torch.equal(first, second)  # partials are summed in split order, whatever order programs finish in
    check(case, first, reference=bitdelta_matmul_reference(*case.args()))
    assert all(int(buf.abs().sum()) == 0 for buf in _decode._COUNTERS.values())


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_plan_reuse_and_in_place(device):
    case = make_case(m=12, k=33, n=20, d=3, p=1, seed=3, device=device, slot_dtype=torch.int32)
    plan = plan_bitdelta_batch(case.slots, 3, block_m=16)
    for seed in (4, 5):  # same slots, new activations: the plan carries over
        case = replace(case, x=torch.randn(12, 33, generator=torch.Generator().manual_seed(seed)).to(device))
        x, out, slots, signs, scales = case.args()
        got = bitdelta_matmul(x, out, slots, signs, scales, backend="triton", plan=plan)
        assert got is out
        check(case, got, reference=bitdelta_matmul_reference(*case.args()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_per_matrix_scale_unexpanded(device):
    case = make_case(m=9, k=20, n=17, d=2, p=2, per_row=False, seed=6, device=device)
    x, out, slots, signs, scales = case.args()
    got = bitdelta_matmul(x, out, slots, signs, scales[:, :, :1], backend="triton")
    check(case, got, reference=bitdelta_matmul_reference(*case.args()))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("slot_mode", ["empty", "no_delta"])
def test_triton_nothing_to_do_returns_out_unchanged(device, slot_mode):
    case = make_case(m=0 if slot_mode == "empty" else 7, k=9, n=5, slot_mode="no_delta", device=device)
    x, out, slots, signs, scales = case.args()
    got = bitdelta_matmul(x, out, slots, signs, scales, backend="triton")
    assert got is out and torch.equal(got, case.out)


# ===================================================================================================
# Reference and dispatch (always run)
# ===================================================================================================


def test_auto_on_cpu_uses_reference(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("CPU tensors must not reach the Triton launcher with backend='auto'")

    monkeypatch.setattr(bd, "_launch_triton", no_triton)
    case = make_case(m=6, k=12, n=7, seed=8)
    check(case, bitdelta_matmul(*case.args()), reference=bitdelta_matmul_reference(*case.args()))
    check(case, bitdelta_matmul(*case.args(), backend="torch"))


def test_plan_groups_rows_by_delta():
    slots = torch.tensor([2, -1, 0, 2, 2, 0, -1, 2])
    plan = plan_bitdelta_batch(slots, 4, block_m=2)
    assert plan.rows.tolist() == [2, 5, 0, 3, 4, 7, 1, 6]  # delta 0, delta 2 (stable), then no-delta rows
    used = plan.tile_slot >= 0
    tiles = (plan.tile_slot[used], plan.tile_start[used], plan.tile_end[used])
    spans = list(zip(*(t.tolist() for t in tiles), strict=True))
    assert spans == [(0, 0, 2), (2, 2, 4), (2, 4, 6)]
    assert plan.any_rows and not plan_bitdelta_batch(torch.full((3,), -1), 4).any_rows


def test_imports_and_runs_without_triton(monkeypatch):
    # CPU-only installs have no triton: the module must import and the reference path must work.
    with kh.kernels_without_triton(monkeypatch, "_kernels_without_triton") as package:
        module = package.bitdelta
        assert module.triton is None
        case = make_case(m=4, k=10, n=3, seed=9)
        check(case, module.bitdelta_matmul(*case.args()))
        with pytest.raises(ImportError, match="triton"):
            module.bitdelta_matmul(*case.args(), backend="triton")


# ===================================================================================================
# Property tests (hypothesis): random shapes, slot patterns, passes, scale kinds, dtypes, tiles
# ===================================================================================================

if given is not None:

    def cases(max_passes: int):
        """``make_case`` arguments: M, K, N, deltas, passes, scale kind, dtype, slot pattern, seed."""
        return st.fixed_dictionaries(
            {
                "m": st.integers(0, 20),
                "k": st.integers(1, 70),
                "n": st.integers(1, 40),
                "d": st.integers(1, 4),
                "p": st.integers(1, max_passes),
                "per_row": st.booleans(),
                "dtype": st.sampled_from(DTYPES),
                "slot_mode": st.sampled_from(SLOT_MODES),
                "seed": st.integers(0, 2**16),
            }
        )

    @pytest.mark.parametrize("device", TRITON_DEVICES)
    @settings(max_examples=80, deadline=None)
    @given(drawn=cases(max_passes=2), config=st.sampled_from(SMALL_CONFIGS + DECODE_CONFIGS))
    def test_triton_matches_reference_and_fp64(device, drawn, config):
        if drawn["dtype"] != torch.float32 and config.block_k < bd.MIN_BLOCK_K_16BIT:
            config = SMALL_CONFIGS[1]  # 16-bit activations refuse block_k 16 (test_triton_sign_load_paths)
        case = make_case(**drawn, device=device)
        reference = bitdelta_matmul_reference(*case.args())
        got = bitdelta_matmul(*case.args(), backend="triton", config=config)
        check(case, got, reference=reference)

    @settings(max_examples=150, deadline=None)
    @given(drawn=cases(max_passes=3))
    def test_reference_matches_fp64(drawn):
        case = make_case(**drawn)
        x, out, slots, signs, scales = case.args()
        got = bitdelta_matmul_reference(x, out, slots, signs, scales)
        assert got is out
        check(case, got)
else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_tests_need_hypothesis():
        pass


# ===================================================================================================
# Bad inputs: every one is an exception, never a silent wrong answer
# ===================================================================================================


def _valid() -> dict[str, torch.Tensor]:
    c = make_case(m=5, k=12, n=6, d=2, p=1, seed=10)
    return {"x": c.x, "out": c.out, "slots": c.slots, "signs": c.signs, "scales": c.scales}


BAD_INPUTS = {
    # name: (change to the valid arguments, exception, message fragment)
    **kh.batch_bad_inputs("bitdelta_matmul", "signs"),
    "signs_int8": (lambda a: {**a, "signs": a["signs"].to(torch.int8)}, TypeError, "uint8"),
    "scales_fp16": (lambda a: {**a, "scales": a["scales"].half()}, TypeError, "float32"),
    "signs_k": (lambda a: {**a, "signs": a["signs"][..., :1]}, ValueError, "ceil"),
    "signs_n": (lambda a: {**a, "signs": a["signs"][:, :, :5]}, ValueError, "signs must be"),
    "signs_3d": (lambda a: {**a, "signs": a["signs"][:, 0]}, ValueError, "signs must be"),
    "scales_d": (lambda a: {**a, "scales": a["scales"][:1]}, ValueError, "scales must be"),
    "scales_p": (lambda a: {**a, "scales": torch.cat([a["scales"]] * 2, 1)}, ValueError, "scales must be"),
    "scales_n": (lambda a: {**a, "scales": a["scales"][..., :5]}, ValueError, "scales must be"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", ["auto", "triton", "reference"])
def test_bad_inputs_raise(name, fn):
    call = kh.bad_input_call(fn, bitdelta_matmul, bitdelta_matmul_reference)
    kh.assert_bad_input_raises(call, _valid(), *BAD_INPUTS[name])


def test_bad_backend_plan_and_config():
    a = _valid()
    kh.assert_rejects_backend_plan_and_config(bitdelta_matmul, a, BitDeltaKernelConfig)
    with pytest.raises(TypeError, match="int32/int64"):
        plan_bitdelta_batch(a["slots"].float(), 2)


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    kh.assert_triton_needs_interpreter(monkeypatch, lambda: bitdelta_matmul(**_valid(), backend="triton"))


# ===================================================================================================
# GPU: the compiled kernel at layer-like shapes, and a compile check that needs no GPU
# ===================================================================================================


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 300])  # decode tiles, and prefill tiles (block_m 64)
@pytest.mark.parametrize(("k", "n"), [(4096, 1024), (4000, 1000), (1001, 520)])  # words, word tails, bytes
def test_cuda_default_configs_match_cpu_reference(dtype, m, k, n):
    # The compiled kernel with the launcher's own tile choice, against the reference computed on the CPU.
    assert not bd._interpret_enabled(), "unset TRITON_INTERPRET to test the compiled kernel"
    case = make_case(m=m, k=k, n=n, d=16, p=2, dtype=dtype, seed=m + k)
    want = bitdelta_matmul_reference(*case.args())
    got = bitdelta_matmul(*(t.cuda() for t in case.args()))
    assert kh.rel_err(got, want) <= TOLERANCES[dtype][1]
    assert kh.rel_err(got, dense_fp64(case)) <= TOLERANCES[dtype][0]


def test_default_config_heuristic(monkeypatch):
    monkeypatch.setattr(bd, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    pick = bd._default_config
    # 16 deltas at decode fill the GPU with wide tiles; one delta needs narrow ones to cover the SMs.
    assert pick(16, 4096, 17, torch.bfloat16, cuda, False).block_n == 256
    assert pick(16, 4096, 2, torch.bfloat16, cuda, False).block_n <= 64
    assert pick(64, 4096, 40, torch.bfloat16, cuda, False).block_k == 64  # prefill tiles
    assert pick(16, 4096, 17, torch.float32, cuda, False).block_k == 32
    assert pick(16, 4096, 17, torch.bfloat16, cuda, True).block_n == 16  # interpreter: smallest tiles
    assert [bd._default_block_m(m) for m in (1, 64, 65, 1024, 4096)] == [16, 16, 64, 64, 128]


_AOT_LOOP = """
bd = sys.modules["_kernels_aot.bitdelta"]
for dtype, unit_bits, even, cfg in cases:
    pointers = {"x_ptr": dtype, "out_ptr": dtype, "signs_ptr": "i32" if unit_bits == 32 else "u8", "scales_ptr": "fp32"}
    constexprs = {
        "BLOCK_M": cfg["block_m"], "BLOCK_N": cfg["block_n"], "BLOCK_U": cfg["block_k"] // unit_bits,
        "UNIT_BITS": unit_bits, "EVEN_N": even, "EVEN_K": even, "PAIRED": dtype != "fp32",
        "NEG_ONE": {"fp16": 0xBC00, "bf16": 0xBF80, "fp32": 0xBF800000}[dtype], "DOT_FP32": False,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32",
    }
    cubin = compile_sm90(bd._bitdelta_kernel, pointers, constexprs, cfg["num_warps"], cfg["num_stages"])
    assert cubin, (dtype, unit_bits, even, cfg)
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above compile and run the real thing")
@pytest.mark.skipif(bd.triton is None, reason="triton not installed")
def test_kernel_compiles_for_h100():
    # The interpreter cannot catch what only the GPU compiler checks (layouts, dot shapes, types); an
    # ahead-of-time sm_90 compile can, without a GPU. Decode and prefill shapes (small tiles compile
    # faster), both sign-load paths, masked and unmasked.
    cases = [
        ("bf16", 32, True, BitDeltaKernelConfig(block_m=16, block_n=64, block_k=64)),
        ("fp16", 8, False, BitDeltaKernelConfig(block_m=64, block_n=64, block_k=32)),
    ]
    kh.compile_for_h100(_AOT_LOOP, [(dtype, unit_bits, even, vars(cfg)) for dtype, unit_bits, even, cfg in cases])
