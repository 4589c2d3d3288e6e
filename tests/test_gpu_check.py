"""benchmarks/gpu_check.sh runs on the CPU in its dry-run mode (toy sizes, interpreter), so a session that has
a GPU for 15 minutes spends them measuring, not debugging the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PHASES = ["tests", "engine", "coserve", "serve-small", "kernels", "serve-7b", "coserve-7b", "scale-7b", "stacking"]


@pytest.mark.slow
def test_every_phase_of_the_gpu_check_runs_dry_on_the_cpu(micro_zoo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT")}
    env.update(GPU_CHECK_DRY_RUN="1", HF_DELTA_ZOO=str(micro_zoo.root.parent), HF_DELTA_BENCH_WORK=str(tmp_path),
               PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    summary = done.stdout[done.stdout.index("--- gpu_check summary"):]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    for phase in PHASES:
        assert f"{phase:<12s} exit   0" in summary, summary
    assert (tmp_path / "results").is_dir()  # dry-run results stay out of benchmarks/results
    for name in ("profile-synthetic-tiny", "coserve-synthetic-tiny"):  # serve-7b's profile, coserve-7b
        assert (tmp_path / "results" / f"{name}.json").is_file(), name
    assert not list((ROOT / "benchmarks" / "results").glob("kernels-cpu-smoke*"))
