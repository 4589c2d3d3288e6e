"""The flags of every benchmark (``hf-delta bench ...`` and the scripts under ``benchmarks/``).

Import-light on purpose (no torch): ``hf-delta --help`` builds these parsers.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..serving.engine.config import add_engine_arguments

ZOO_DIR_HELP = "zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)"


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v]


def _floats(value: str) -> list[float]:
    return [float(v) for v in value.split(",") if v]


def _words(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def add_bench_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta bench serve``."""
    parser.add_argument("--size", default="small", help="zoo size (micro or small)")
    parser.add_argument("--dir", default=None, help="zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)")
    parser.add_argument("--synthetic", default=None, choices=["llama-7b", "tiny"],
                        help="random weights of this shape instead of the zoo (for GPUs)")
    parser.add_argument("--deltas", type=_ints, default=[1, 4, 16, 64], help="numbers of served deltas")
    parser.add_argument("--popularity", type=_words, default=["uniform", "skewed"], help="uniform and/or skewed")
    parser.add_argument("--systems", type=_words, default=["engine", "naive", "merged", "peft"])
    parser.add_argument("--requests", type=int, default=128, help="requests per workload")
    parser.add_argument("--rate", type=_floats, default=[64.0, math.inf],
                        help="Poisson arrival rates, comma-separated (requests/s; inf = all at once)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="batch size limit of the baselines (default: the engine's --max-running)")
    parser.add_argument("--load-repeats", type=int, default=5, help="repetitions of the load-time measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads for every system")
    parser.add_argument("--warm", action="store_true",
                        help="before timing the engine, run the workload once over every served name (deltas "
                             "loaded, kernels compiled and tuned outside the timed window)")
    parser.add_argument("--profile", action="store_true",
                        help="after each engine run, profile its decode steps: time per op category "
                             "(profile-<name>.json/.md beside the results)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "hf_delta" / "bench-serve"),
                        help="where compressed/synthetic deltas are cached")
    add_engine_arguments(parser, device_slots=16, cpu_slots=16)  # the sizes the recorded results used


def add_bench_coserve_arguments(parser) -> None:
    """Flags of ``hf-delta bench coserve``."""
    parser.add_argument("--size", default="small", help="zoo size (micro or small)")
    parser.add_argument("--dir", default=None, help="zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)")
    parser.add_argument("--requests", type=int, default=64, help="inference requests in the workload")
    parser.add_argument("--rate", type=float, default=2.0, help="Poisson arrival rate (requests/s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slo-factor", type=float, default=1.15,
                        help="TPOT SLO of co-serving as a multiple of inference-alone TPOT p50")
    parser.add_argument("--idle-factor", type=float, default=4.0,
                        help="length of training-only steps (no request waiting) as a multiple of the SLO")
    parser.add_argument("--finetune-steps", type=int, default=30, help="optimizer steps of the fine-tune-alone run")
    parser.add_argument("--synthetic", default=None, choices=["llama-7b", "tiny"],
                        help="random weights of this shape instead of the zoo (for GPUs)")
    parser.add_argument("--deltas", type=int, default=4, help="served names of the synthetic delta")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per training sequence (default: 512 with --synthetic, else 64)")
    parser.add_argument("--lora-layers", type=int, default=None,
                        help="LoRA on the last N decoder layers (default: 4 with --synthetic, else every layer)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="base weights dtype (default: bfloat16 for --synthetic on CUDA, else float32)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="replay inference-only decode steps as CUDA graphs (CUDA only; steps carrying "
                             "fine-tuning tokens run eagerly either way)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "hf_delta" / "bench-serve"),
                        help="where compressed deltas and job outputs are kept")


def add_bench_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta bench ray``."""
    parser.add_argument("--size", default="small", help="zoo size (micro or small)")
    parser.add_argument("--dir", default=None, help="zoo root (default $HF_DELTA_ZOO or ~/.cache/hf_delta/zoo)")
    parser.add_argument("--deltas", type=int, default=32, help="served delta names per phase")
    parser.add_argument("--requests", type=int, default=256, help="requests per phase")
    parser.add_argument("--rate", type=float, default=6.0,
                        help="Poisson arrival rate of the residency phases (requests/s; keep it below saturation)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (EOS ignored)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device-slots", type=int, default=4, help="deltas attached per replica")
    parser.add_argument("--cpu-slots", type=int, default=4, help="further deltas in CPU memory per replica")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per replica")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "hf_delta" / "bench-serve"),
                        help="where the compressed zoo deltas are cached (shared with bench serve)")


def add_bench_fidelity_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta bench fidelity``."""
    parser.add_argument("--size", default="small")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--settings", default="bitdelta-initial,bitdelta",
                        help="comma-separated setting names (see hf_delta.bench.fidelity.SETTINGS)")
    parser.add_argument("--finetunes", default=None, help="comma-separated zoo fine-tunes (default: all)")
    parser.add_argument("--calibration", choices=["task", "sampled"], default="task",
                        help="calibration texts: the fine-tune's training split, or sampled from it (data-free)")
    parser.add_argument("--merge", action="store_true",
                        help="keep rows of other settings already in the results file (run a long grid in parts)")
    parser.add_argument("--lm-eval", default=None, metavar="TASKS",
                        help="also score with lm-evaluation-harness (pip install 'hf_delta[eval]'): comma-separated "
                             "task names; 'zoo' is the fine-tune's own task as local lm-eval tasks. Results go to "
                             "fidelity-<size>-lm-eval.*")
    parser.add_argument("--lm-eval-include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAML files (repeatable)")
    parser.add_argument("--lm-eval-limit", type=float, default=None,
                        help="at most this many documents per lm-eval task (below 1: that fraction)")


SCALE_SIZES = ("tiny", "0.1b", "0.85b", "7b")  # hf_delta.bench.scale_pair.SHAPES (not imported: it loads torch)
SCALE_METHODS = ("bitdelta", "lowrank", "deltazip", "bitdelta-distill", "load")


def _choices(allowed: tuple[str, ...]):
    def parse(value: str) -> list[str]:
        words = _words(value)
        bad = [w for w in words if w not in allowed]
        if bad or not words:
            raise argparse.ArgumentTypeError(f"{value!r}: expected a comma-separated subset of {','.join(allowed)}")
        return words

    return parse


def add_bench_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``hf-delta bench scale``."""
    import tempfile

    parser.add_argument("--sizes", type=_choices(SCALE_SIZES), default=["0.85b"],
                        help=f"synthetic Llama shapes, comma-separated ({','.join(SCALE_SIZES)})")
    parser.add_argument("--methods", type=_choices(SCALE_METHODS), default=list(SCALE_METHODS),
                        help="measurements, comma-separated: compression methods and 'load' (N 1-bit deltas on "
                             "the base + generate)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (then torch.cuda.max_memory_allocated too)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per measurement")
    parser.add_argument("--rank", type=int, default=16, help="low-rank: singular values kept per matrix")
    parser.add_argument("--calibration", type=int, default=32, help="DeltaZip: calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sequence")
    parser.add_argument("--distill-steps", type=int, default=5, help="BitDelta distillation: Adam steps")
    parser.add_argument("--distill-batch", type=int, default=1, help="BitDelta distillation: sequences per step")
    parser.add_argument("--deltas", type=int, default=4, help="load: 1-bit deltas put on the base")
    parser.add_argument("--new-tokens", type=int, default=4, help="load: tokens generated per row")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic pair")
    parser.add_argument("--dry-run", action="store_true",
                        help="shapes, bytes and the memory check only; writes no checkpoint")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "hf-delta-scale"),
                        help="where the synthetic checkpoints and deltas are kept (reused across runs)")
