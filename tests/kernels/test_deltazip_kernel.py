"""The mixed-batch DeltaZip matmul: Triton kernel vs. its PyTorch reference vs. fp64 maths from DeltaZipWeight.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (``conftest.py`` sets
``TRITON_INTERPRET=1``); with one (``benchmarks/gpu_check.sh``) the compiled kernel runs on CUDA tensors.
The fp64 oracle decodes each delta with ``DeltaZipWeight.to_dense`` (the storage format's own decoder), so
the kernel is checked against the format, not against a second copy of the kernel's unpacking.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import kernel_helpers as kh
import pytest
import torch
from kernel_helpers import DTYPES, SLOT_MODES, TOLERANCES, TRITON_DEVICES, given, settings, st

import hf_delta.kernels.deltazip as dzk
from hf_delta.kernels import (
    DecodeConfig,
    DeltaZipKernelConfig,
    deltazip_kernel_supports,
    deltazip_matmul,
    deltazip_matmul_reference,
    plan_bitdelta_batch,
)
from hf_delta.methods.deltazip import DeltaZipWeight
from hf_delta.packing import pack_1bit_u8, pack_2of4_u8, pack_lowbit_u8

# Small tiles (interpreter cost grows with tile area). With group scales, a block_k dividing the group
# size scales once per step (mode 1); any other block_k scales per element (mode 2): hypothesis draws both.
SMALL_CONFIGS = [DeltaZipKernelConfig(**tiles) for tiles in kh.SMALL_TILES]
DECODE_CONFIGS = [DecodeConfig(**tiles) for tiles in kh.DECODE_TILES]


# ===================================================================================================
# Case construction and oracles
# ===================================================================================================


@dataclass
class Case(kh.Batch):
    weights: list[DeltaZipWeight]  # the D deltas, as the library stores them (CPU)
    qweight: torch.Tensor
    scales: torch.Tensor
    positions: torch.Tensor | None
    bits: int
    layout: str
    group_size: int | None

    def args(self) -> tuple[torch.Tensor, ...]:
        """Fresh positional arguments (``out`` cloned, so every call starts from the same state)."""
        return self.x, self.out.clone(), self.slots, self.qweight, self.scales

    def kw(self) -> dict[str, object]:
        return {"bits": self.bits, "layout": self.layout, "group_size": self.group_size, "positions": self.positions}


def make_weight(n: int, k: int, *, bits: int, layout: str, group_size: int | None, g: torch.Generator):
    """A random DeltaZipWeight ``[n, k]`` built through the library's own packers."""
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, (n, k), generator=g)
    groups = 1 if group_size is None else k // group_size
    # fp16 scales, as DeltaZip stores them; a few orders of magnitude apart across rows and groups.
    scales = (10 ** (-3 * torch.rand(n, groups, generator=g)) * 0.1).half()
    mask = None
    if layout == "2:4":
        order = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, order, True).reshape(n, k)
        qweight, mask = pack_lowbit_u8(q[keep].reshape(n, k // 2), bits), pack_2of4_u8(keep)
    else:
        qweight = pack_lowbit_u8(q, bits)
    return DeltaZipWeight(
        (n, k), bits=bits, group_size=group_size, layout=layout, qweight=qweight, scales=scales, mask=mask
    )


def make_case(
    *,
    m: int,
    k: int,
    n: int,
    d: int = 2,
    bits: int = 4,
    layout: str = "dense",
    group_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    slot_mode: str = "random",
    seed: int = 0,
    device: str = "cpu",
    slot_dtype: torch.dtype = torch.int64,
) -> Case:
    g = torch.Generator().manual_seed(seed)
    weights = [make_weight(n, k, bits=bits, layout=layout, group_size=group_size, g=g) for _ in range(d)]
    x = torch.randn(m, k, generator=g).to(dtype)
    out = (0.5 * torch.randn(m, n, generator=g)).to(dtype)
    slots = kh.make_slots(slot_mode, m, d, g)
    qweight = torch.stack([w.qweight for w in weights])
    scales = torch.stack([w.scales for w in weights])
    positions = torch.stack([w.mask for w in weights]) if layout == "2:4" else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Case(
        to(x),
        to(out),
        to(slots.to(slot_dtype)),
        weights,
        to(qweight),
        to(scales),
        to(positions),
        bits,
        layout,
        group_size,
    )


def dense_fp64(case: Case) -> torch.Tensor:
    """``out + x @ Δ[slot]ᵀ`` in fp64 with each Δ decoded by ``DeltaZipWeight.to_dense`` (exact in fp32)."""
    x, slots = case.x.cpu().double(), case.slots.cpu().long()
    expected = case.out.cpu().double().clone()
    for d, w in enumerate(case.weights):
        rows = slots == d
        if rows.any():
            expected[rows] += x[rows] @ w.to_dense(torch.float32).double().T
    return expected


MAX_SEEN: dict[torch.dtype, float] = {}  # largest relative error vs fp64 per dtype (printed with -s)


def check(case: Case, got: torch.Tensor, *, reference: torch.Tensor | None = None) -> None:
    kh.check_result(got, case.out, case.slots, dense_fp64(case), reference=reference, max_seen=MAX_SEEN)


def run_triton(case: Case, config: DeltaZipKernelConfig | DecodeConfig | None = None, **kw) -> torch.Tensor:
    return deltazip_matmul(*case.args(), **case.kw(), backend="triton", config=config, **kw)


def run_reference(case: Case) -> torch.Tensor:
    return deltazip_matmul_reference(*case.args(), **case.kw())


@pytest.fixture(scope="module", autouse=True)
def _report_errors():
    yield
    if MAX_SEEN:
        print("\nmax relative error vs fp64:", {str(k): f"{v:.2e}" for k, v in MAX_SEEN.items()})


# ===================================================================================================
# Triton kernel (interpreter on CPU, compiled on CUDA)
# ===================================================================================================

# Every layout x bits x scale kind once, the dtype rotating (hypothesis below draws all combinations).
FORMATS = [
    (layout, bits, group_size, DTYPES[i % 3])
    for i, (layout, bits, group_size) in enumerate(
        (layout, bits, group_size) for layout in ("dense", "2:4") for bits in (2, 4) for group_size in (None, 16)
    )
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("layout", "bits", "group_size", "dtype"), FORMATS)
def test_triton_formats(device, layout, bits, group_size, dtype):
    # K=48 is no multiple of the interpreter's default block_k=64 (a K tail), N=20 leaves an N tail.
    case = make_case(
        m=11, k=48, n=20, d=3, bits=bits, layout=layout, group_size=group_size, dtype=dtype, seed=bits, device=device
    )
    check(case, run_triton(case), reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(
    ("layout", "k", "group_size", "config", "mode"),
    [
        ("dense", 64, 32, SMALL_CONFIGS[0], 1),  # two K steps per group: one scale per step
        ("2:4", 64, 16, SMALL_CONFIGS[2], 2),  # 4 groups in one step: per-element scales
        ("dense", 30, 10, SMALL_CONFIGS[1], 2),  # group size with no power-of-two factor >= 16
        ("dense", 33, None, SMALL_CONFIGS[1], 0),  # 4-bit rows of 16.5 bytes: half a byte of padding
    ],
)
def test_triton_scale_modes(device, layout, k, group_size, config, mode):
    case = make_case(m=9, k=k, n=24, d=2, layout=layout, group_size=group_size, seed=k, device=device)
    assert dzk._scale_mode(case.scales, group_size, config.block_k) == mode
    check(case, run_triton(case, config), reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("layout", "dtype"), [("dense", torch.bfloat16), ("2:4", torch.float16)])
def test_triton_8bit(device, layout, dtype):
    # 8-bit values: bf16 has too few mantissa bits for the magic-number decode and converts instead.
    case = make_case(m=7, k=40, n=18, d=2, bits=8, layout=layout, dtype=dtype, seed=8, device=device)
    check(case, run_triton(case), reference=run_reference(case))


# Split-K decode kernel: every bits x layout at every batch size of the brief, with N / K tails, word and
# byte loads, and the three scale modes (per channel; per group once per step; per group per element).
DECODE_SHAPES = [
    (100, 20, None, DECODE_CONFIGS[1]),  # K 100: 50 / 25 bytes of 4 / 2-bit values: byte loads, K tail
    (96, 40, 32, DECODE_CONFIGS[0]),  # word loads; group 32 = block_k: one scale per step
    (96, 24, 48, DECODE_CONFIGS[2]),  # group 48 vs block_k 64: scaled per element
]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize(("layout", "bits"), [(lay, b) for lay in ("dense", "2:4") for b in (2, 4, 8)])
@pytest.mark.parametrize("m", [1, 3, 16, 33])
def test_decode_kernel_matches_reference(device, layout, bits, m):
    k, n, group_size, config = DECODE_SHAPES[(m + bits) % len(DECODE_SHAPES)]
    dtype = DTYPES[(m + len(layout)) % len(DTYPES)]
    case = make_case(m=m, k=k, n=n, d=3, bits=bits, layout=layout, group_size=group_size, dtype=dtype,
                     seed=m * bits, device=device)
    check(case, run_triton(case, config), reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["dense", "2:4"])
def test_triton_segments_spanning_several_tiles(device, layout):
    # 50 rows, most on one delta: that segment needs 3 tiles of 16 rows, the last one partial.
    case = make_case(m=50, k=40, n=24, d=3, layout=layout, group_size=8, slot_mode="gaps", seed=1, device=device)
    check(case, run_triton(case, SMALL_CONFIGS[0]), reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("m", [1, 80])
def test_triton_default_config(device, m):
    # The launcher's own pick (decode vs. prefill tiles on GPU); K and N off any block multiple.
    k, n = (56, 24) if device == "cpu" else (1000, 600)
    case = make_case(m=m, k=k, n=n, d=5, layout="2:4", group_size=8, dtype=torch.float16, seed=m, device=device)
    check(case, run_triton(case), reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_plan_reuse_out_view_and_in_place(device):
    case = make_case(m=12, k=36, n=20, d=3, bits=2, seed=3, device=device, slot_dtype=torch.int32)
    plan = plan_bitdelta_batch(case.slots, 3, block_m=16)  # the 1-bit kernel's plan serves this one too
    for seed in (4, 5):  # same slots, new activations: the plan carries over
        case = replace(case, x=torch.randn(12, 36, generator=torch.Generator().manual_seed(seed)).to(device))
        # out as a column slice of a wider buffer, like DeltaLinear's base output head
        wide = torch.zeros(12, 27, device=device)
        wide[:, :20] = case.out
        got = deltazip_matmul(
            case.x, wide[:, :20], case.slots, case.qweight, case.scales, **case.kw(), backend="triton", plan=plan
        )
        assert got.data_ptr() == wide.data_ptr() and not wide[:, 20:].any()
        check(case, got, reference=run_reference(case))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("slot_mode", ["empty", "no_delta"])
def test_triton_nothing_to_do_returns_out_unchanged(device, slot_mode):
    case = make_case(m=0 if slot_mode == "empty" else 7, k=8, n=5, slot_mode="no_delta", device=device)
    x, out, slots, qweight, scales = case.args()
    got = deltazip_matmul(x, out, slots, qweight, scales, **case.kw(), backend="triton")
    assert got is out and torch.equal(got, case.out)


# ===================================================================================================
# Reference and dispatch (always run)
# ===================================================================================================


def test_auto_on_cpu_uses_reference(monkeypatch):
    def no_triton(*args, **kwargs):
        raise AssertionError("CPU tensors must not reach the Triton launcher with backend='auto'")

    monkeypatch.setattr(dzk, "_launch_triton", no_triton)
    case = make_case(m=6, k=12, n=7, layout="2:4", group_size=4, seed=8)
    check(case, deltazip_matmul(*case.args(), **case.kw()), reference=run_reference(case))
    check(case, deltazip_matmul(*case.args(), **case.kw(), backend="torch"))


def test_three_bit_runs_on_the_reference_only():
    case = make_case(m=6, k=24, n=7, bits=3, layout="2:4", group_size=8, seed=9)
    check(case, deltazip_matmul(*case.args(), **case.kw()))
    assert not deltazip_kernel_supports(3, "dense") and not deltazip_kernel_supports(4, "bitmap")
    assert deltazip_kernel_supports(2, "2:4") and deltazip_kernel_supports(8, "dense")
    with pytest.raises(ValueError, match="3-bit deltas run on the reference"):
        deltazip_matmul(*case.args(), **case.kw(), backend="triton")


def test_imports_and_runs_without_triton(monkeypatch):
    # CPU-only installs have no triton: the package must import and the reference path must work.
    with kh.kernels_without_triton(monkeypatch, "_kernels_without_triton") as package:
        module = package.deltazip
        assert module.triton is None
        case = make_case(m=4, k=10, n=3, seed=9)
        check(case, module.deltazip_matmul(*case.args(), **case.kw()))
        with pytest.raises(ImportError, match="triton"):
            module.deltazip_matmul(*case.args(), **case.kw(), backend="triton")


# ===================================================================================================
# DeltaZipWeight.add_to_rows routing
# ===================================================================================================


def _spy(monkeypatch) -> list[str]:
    import hf_delta.kernels

    calls: list[str] = []
    real = hf_delta.kernels.deltazip_matmul

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_delta.kernels, "deltazip_matmul", spy)
    return calls


def _bitmap_weight(n: int, k: int, g: torch.Generator) -> DeltaZipWeight:
    keep = torch.rand(n, k, generator=g) < 0.4
    q = torch.randint(-8, 8, (n, k), generator=g) * keep
    scales = (0.01 + 0.1 * torch.rand(n, 1, generator=g)).half()
    return DeltaZipWeight(
        (n, k),
        bits=4,
        group_size=None,
        layout="bitmap",
        qweight=pack_lowbit_u8(q[keep], 4),
        scales=scales,
        mask=pack_1bit_u8(keep),
    )


def test_add_to_rows_routes_kernel_formats_and_falls_back_for_the_rest(monkeypatch):
    if "cpu" not in TRITON_DEVICES:
        pytest.skip("needs the Triton interpreter on CPU tensors")
    g = torch.Generator().manual_seed(11)
    n, k = 24, 32
    sparse_rows = torch.randint(-2, 2, (n, k), generator=g) * (torch.arange(n) % 3 == 0)[:, None]
    cases = {
        "4-bit 2:4 groups": (make_weight(n, k, bits=4, layout="2:4", group_size=16, g=g), True),
        "2-bit dense": (make_weight(n, k, bits=2, layout="dense", group_size=None, g=g), True),
        "3-bit dense": (make_weight(n, k, bits=3, layout="dense", group_size=8, g=g), False),
        "bitmap": (_bitmap_weight(n, k, g), False),
        "row_index": (
            DeltaZipWeight.from_quantized(
                sparse_rows, torch.ones(n, 1).half(), None, bits=2, group_size=None, layout="dense"
            ),
            False,
        ),
    }
    assert cases["row_index"][0]._row_index is not None
    calls = _spy(monkeypatch)
    x = torch.randn(10, k, generator=g)
    rows = torch.tensor([0, 3, 4, 9])
    for name, (weight, fused) in cases.items():
        base = torch.randn(10, n, generator=g)
        want = base.clone()
        monkeypatch.delenv("HF_DELTA_KERNELS", raising=False)
        weight.add_to_rows(x, want, rows)  # CPU default: the generic dense path
        assert not calls, name
        got = base.clone()
        monkeypatch.setenv("HF_DELTA_KERNELS", "triton")
        weight.add_to_rows(x, got, rows)
        assert calls == (["triton"] if fused else []), name
        calls.clear()
        assert kh.rel_err(got, want) < 1e-5, name
        assert torch.equal(got[[1, 2, 5, 6, 7, 8]], base[[1, 2, 5, 6, 7, 8]]), name


def test_layer_mixed_batch_through_the_kernel_equals_the_reference(micro_zoo, monkeypatch, torch_one_thread):
    """A DeltaModel with DeltaZip deltas of two fine-tunes and base rows in one batch: kernel vs. default path.

    Without a GPU the kernel runs interpreted on CPU (``HF_DELTA_KERNELS=triton``); with one, the model moves to
    CUDA, where the kernel is the default, and is compared with the CPU run of the PyTorch path.
    """
    from hf_delta import DeltaModel, DeltaZipConfig, compress
    from hf_delta.utils.loading import load_model, load_tokenizer

    if not TRITON_DEVICES:
        pytest.skip("needs CUDA or the Triton interpreter")
    base_path = micro_zoo["llama-base"].path
    model = DeltaModel(load_model(base_path).eval())
    # Round-to-nearest (no calibration: fast); 4-bit 2:4 per channel and 2-bit dense with groups, plus the
    # 8-bit dense output head both get by default.
    configs = {
        "llama-arith": DeltaZipConfig(bits=4, sparsity="2:4", use_hessian=False),
        "llama-cipher": DeltaZipConfig(bits=2, sparsity=None, group_size=16, use_hessian=False),
    }
    for name, config in configs.items():
        compressed = compress(base_path, micro_zoo[name].path, config, progress=False)
        model.add_delta(name, compressed.get_delta("default"))
    tok = load_tokenizer(base_path)
    batch = tok(["add 1 to 1 2 3 4 =", "encode a b c d =", "def f(x):"], return_tensors="pt", padding=True)
    names = ["llama-arith", "llama-cipher", "__base__"]
    calls = _spy(monkeypatch)
    with torch.no_grad():
        reference = model(**batch, delta_names=names).logits
        assert not calls  # CPU tensors take the PyTorch path by default
        if TRITON_DEVICES == ["cuda"]:
            model.to("cuda")
            batch = batch.to("cuda")
        else:
            monkeypatch.setenv("HF_DELTA_KERNELS", "triton")
        kernel = model(**batch, delta_names=names).logits.cpu()
    assert calls and set(calls) <= {"triton", "auto"}
    err = (kernel - reference).abs().max() / reference.abs().max()
    assert err < (1e-4 if TRITON_DEVICES == ["cuda"] else 1e-5), f"max relative error {err:.2e}"


# ===================================================================================================
# Property tests (hypothesis): random shapes, formats, slot patterns, scale kinds, dtypes, tiles
# ===================================================================================================

if given is not None:

    @st.composite
    def formats(draw, bits_choices=(2, 4)) -> dict[str, object]:
        """M, N, K, layout, bits and group size; K a multiple of 4 for 2:4 and of the group size."""
        layout = draw(st.sampled_from(["dense", "2:4"]))
        group_size = draw(st.sampled_from([None, None, 4, 8, 12, 16, 32]))  # all multiples of 4, for 2:4
        unit = group_size or (4 if layout == "2:4" else 1)
        k = unit * draw(st.integers(1, max(1, 72 // unit)))
        return {
            "m": draw(st.integers(0, 20)),
            "n": draw(st.integers(1, 40)),
            "k": k,
            "layout": layout,
            "bits": draw(st.sampled_from(bits_choices)),
            "group_size": group_size,
        }

    @pytest.mark.parametrize("device", TRITON_DEVICES)
    @settings(max_examples=60, deadline=None)
    @given(
        fmt=formats(bits_choices=(2, 4, 8)),
        d=st.integers(1, 4),
        dtype=st.sampled_from(DTYPES),
        slot_mode=st.sampled_from(SLOT_MODES),
        config=st.sampled_from(SMALL_CONFIGS + DECODE_CONFIGS),  # the tile kernel and the split-K decode kernel
        seed=st.integers(0, 2**16),
    )
    def test_triton_matches_reference_and_fp64(device, fmt, d, dtype, slot_mode, config, seed):
        case = make_case(**fmt, d=d, dtype=dtype, slot_mode=slot_mode, seed=seed, device=device)
        check(case, run_triton(case, config), reference=run_reference(case))

    @settings(max_examples=60, deadline=None)
    @given(
        fmt=formats(bits_choices=(2, 3, 4, 8)),
        d=st.integers(1, 4),
        dtype=st.sampled_from(DTYPES),
        slot_mode=st.sampled_from(SLOT_MODES),
        seed=st.integers(0, 2**16),
    )
    def test_reference_matches_fp64(fmt, d, dtype, slot_mode, seed):
        case = make_case(**fmt, d=d, dtype=dtype, slot_mode=slot_mode, seed=seed)
        x, out, slots, qweight, scales = case.args()
        got = deltazip_matmul_reference(x, out, slots, qweight, scales, **case.kw())
        assert got is out
        check(case, got)
else:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_tests_need_hypothesis():
        pass


# ===================================================================================================
# Bad inputs: every one is an exception, never a silent wrong answer
# ===================================================================================================


def _valid() -> dict[str, object]:
    c = make_case(m=5, k=16, n=6, d=2, layout="2:4", group_size=8, seed=10)
    return {"x": c.x, "out": c.out, "slots": c.slots, "qweight": c.qweight, "scales": c.scales, **c.kw()}


BAD_INPUTS = {
    # name: (change to the valid arguments, exception, message fragment)
    **kh.batch_bad_inputs("deltazip_matmul", "qweight"),
    "positions_missing": (lambda a: {**a, "positions": None}, TypeError, "`positions` must be a torch.Tensor"),
    "qweight_int8": (lambda a: {**a, "qweight": a["qweight"].to(torch.int8)}, TypeError, "uint8"),
    "scales_int": (lambda a: {**a, "scales": a["scales"].to(torch.int32)}, TypeError, "scales must be"),
    "positions_int": (lambda a: {**a, "positions": a["positions"].int()}, TypeError, "positions must be uint8"),
    "bits": (lambda a: {**a, "bits": 5}, ValueError, "bits must be one of"),
    "layout_bitmap": (lambda a: {**a, "layout": "bitmap"}, ValueError, "bitmap rows cannot be tiled"),
    "group_size_zero": (lambda a: {**a, "group_size": 0}, ValueError, "group_size must be"),
    "group_size_missing": (lambda a: {**a, "group_size": None}, ValueError, r"scales must be \[D, N, 1\]"),
    "group_size_wrong": (lambda a: {**a, "group_size": 4}, ValueError, "scales must be"),
    "positions_for_dense": (
        lambda a: {**a, "layout": "dense", "qweight": torch.zeros(2, 6, 8, dtype=torch.uint8)},
        ValueError,
        "only for layout='2:4'",
    ),
    "k_not_multiple_of_4": (lambda a: {**a, "x": torch.randn(5, 18)}, ValueError, "divisible by 4"),
    "qweight_k": (lambda a: {**a, "qweight": a["qweight"][..., :3]}, ValueError, "qweight must be"),
    "qweight_bits": (lambda a: {**a, "bits": 2}, ValueError, "qweight must be"),
    "qweight_n": (lambda a: {**a, "qweight": a["qweight"][:, :5]}, ValueError, "qweight must be"),
    "positions_shape": (lambda a: {**a, "positions": a["positions"][:1]}, ValueError, "positions must be"),
    "scales_d": (lambda a: {**a, "scales": a["scales"][:1]}, ValueError, "scales must be"),
    "scales_n": (lambda a: {**a, "scales": a["scales"][:, :5]}, ValueError, "scales must be"),
    "out_columns_strided": (lambda a: {**a, "out": a["out"].T.contiguous().T}, ValueError, "out rows"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", ["auto", "triton", "reference"])
def test_bad_inputs_raise(name, fn):
    call = kh.bad_input_call(fn, deltazip_matmul, deltazip_matmul_reference)
    kh.assert_bad_input_raises(call, _valid(), *BAD_INPUTS[name])


def test_bad_backend_plan_and_config():
    a = _valid()
    kh.assert_rejects_backend_plan_and_config(deltazip_matmul, a, DeltaZipKernelConfig)
    with pytest.raises(ValueError, match="plan was built"):
        deltazip_matmul(**a, plan=plan_bitdelta_batch(a["slots"], 3))


def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    kh.assert_triton_needs_interpreter(monkeypatch, lambda: deltazip_matmul(**_valid(), backend="triton"))


def test_default_config_heuristic(monkeypatch):
    monkeypatch.setattr(dzk, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    pick = dzk._default_config
    fp16, bf16 = torch.float16, torch.bfloat16
    # 16 deltas at decode fill the GPU with wide tiles; one delta needs narrow ones to cover the SMs.
    assert pick(16, 4096, 17, bf16, "dense", None, cuda, False).block_n == 128
    assert pick(16, 4096, 2, bf16, "dense", None, cuda, False).block_n <= 64
    assert pick(16, 4096, 17, bf16, "2:4", None, cuda, False).block_k == 256
    assert pick(16, 4096, 17, fp16, "2:4", 128, cuda, False).block_k == 128  # capped by the group size
    assert pick(16, 4096, 17, fp16, "dense", 48, cuda, False).block_k == 16  # 48 = 16 x 3
    assert pick(64, 4096, 40, bf16, "dense", None, cuda, False).block_k == 64  # prefill tiles
    assert pick(16, 4096, 17, torch.float32, "dense", None, cuda, False).block_k == 32
    assert pick(16, 4096, 17, bf16, "dense", None, cuda, True).block_n == 64  # interpreter: few programs
    assert pick(16, 4096, 17, bf16, "dense", 16, cuda, True).block_k == 16


# ===================================================================================================
# GPU: the compiled kernel at layer-like shapes, and a compile check that needs no GPU
# ===================================================================================================


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 16, 300])  # decode tiles, and prefill tiles (block_m 64)
@pytest.mark.parametrize(
    ("layout", "bits", "group_size", "k", "n"),
    [
        ("dense", 4, None, 4096, 1024),
        ("2:4", 4, 128, 3968, 1000),
        ("2:4", 2, None, 1004, 520),
        ("dense", 2, 48, 1008, 520),
    ],
)
def test_cuda_default_configs_match_cpu_reference(dtype, m, layout, bits, group_size, k, n):
    # The compiled kernel with the launcher's own tile choice, against the reference computed on the CPU.
    assert not dzk._interpret_enabled(), "unset TRITON_INTERPRET to test the compiled kernel"
    case = make_case(m=m, k=k, n=n, d=4, bits=bits, layout=layout, group_size=group_size, dtype=dtype, seed=m + k)
    want = run_reference(case)
    kw = {**case.kw(), "positions": None if case.positions is None else case.positions.cuda()}
    got = deltazip_matmul(*(t.cuda() for t in case.args()), **kw)
    assert kh.rel_err(got, want) <= TOLERANCES[dtype][1]
    assert kh.rel_err(got, dense_fp64(case)) <= TOLERANCES[dtype][0]


_AOT_LOOP = """
dz = sys.modules["_kernels_aot.deltazip"]
dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
for dtype, bits, layout, mode, even, cfg in cases:
    config = dz.DeltaZipKernelConfig(**cfg)
    constexprs = dz._kernel_constexprs(dtypes[dtype], bits, layout, mode, config, even, even, False)
    pointers = {"x_ptr": dtype, "out_ptr": dtype, "q_ptr": "u8", "pos_ptr": "u8", "scales_ptr": "fp16"}
    cubin = compile_sm90(dz._deltazip_kernel, pointers, constexprs, config.num_warps, config.num_stages)
    assert cubin, (dtype, bits, layout, mode, even, cfg)
print("OK")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests above compile and run the real thing")
@pytest.mark.skipif(dzk.triton is None, reason="triton not installed")
def test_kernel_compiles_for_h100():
    # The interpreter cannot catch what only the GPU compiler checks (layouts, dot shapes, types, the bf16
    # decode the interpreter replaces); an ahead-of-time sm_90 compile can, without a GPU. Decode and
    # prefill tiles, both layouts, group scales per step and per element, the magic-number and the
    # converting decode, with and without masks.
    cases = [
        ("bf16", 4, "2:4", 1, True, {"block_m": 16, "block_n": 64, "block_k": 128}),
        ("bf16", 8, "dense", 2, False, {"block_m": 64, "block_n": 32, "block_k": 32, "num_warps": 8}),
    ]
    kh.compile_for_h100(_AOT_LOOP, cases)
