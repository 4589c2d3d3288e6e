"""The TPOT-SLO scheduler of co-serving, and the fine-tuning jobs HTTP API."""

from __future__ import annotations

import json
import time

import pytest
from http_helpers import request_json

from hf_delta.serving.training.budget import CoServeScheduler, StepTimeModel


def _fed(a=0.004, b=2e-5, c=5e-5, d=3e-5, e=5e-4) -> CoServeScheduler:
    sched = CoServeScheduler(tpot_slo_ms=10.0)
    for k in range(64):
        n_inf, n_fwd = (k * 7) % 40, (k * 13) % 96 if k % 3 else 0
        layers = k % 3
        tokens = layers * (20 + 10 * (k % 5))
        sched.observe(n_inf, n_fwd, tokens, layers, a + b * n_inf + c * n_fwd + d * tokens + e * layers)
    return sched


def test_step_time_fit_recovers_costs_and_budgets_the_slo():
    sched = _fed()
    coef = sched.model.coef
    assert coef == pytest.approx([0.004, 2e-5, 5e-5, 3e-5, 5e-4], rel=1e-3)
    left = sched.budget(100, idle=False)
    assert left == pytest.approx(0.010 - 0.004 - 100 * 2e-5, rel=1e-3)
    assert sched.forward_tokens(left) == int(left / 5e-5)
    assert sched.backward_layers(left, 40, left=4) == min(4, int(left / (5e-4 + 40 * 3e-5)))
    # Peak inference load: inference alone reaches the SLO, training gets nothing (inference never waits).
    assert sched.budget(400, idle=False) == 0.0
    assert sched.forward_tokens(0.0) == 0 and sched.backward_layers(0.0, 40, left=4) == 0
    # No request running or waiting: a training-only step may take the whole SLO.
    assert sched.budget(0, idle=True) == pytest.approx(0.010)


def test_probing_before_the_fit_is_ready():
    sched = CoServeScheduler(tpot_slo_ms=20.0, probe_tokens=(8, 32), model=StepTimeModel(min_samples=4))
    assert not sched.model.ready
    assert [sched.forward_tokens(0.02) for _ in range(3)] == [8, 32, 8]
    assert sched.backward_layers(0.02, 100, left=3) == 1
    for n in range(4):
        sched.observe(n, 8 * n, 0, 0, 0.001 + n * 1e-4)
    assert sched.model.ready


def test_bad_scheduler_settings():
    from hf_delta.errors import EngineConfigError

    with pytest.raises(EngineConfigError, match="tpot_slo_ms"):
        CoServeScheduler(tpot_slo_ms=0)


# ------------------------------------------------------------------------------------------- HTTP API
def _call(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
    return request_json(url, method=method, body=json.dumps(body).encode() if body is not None else None)


def test_fine_tuning_jobs_api(micro_base, tmp_path, torch_one_thread):
    pytest.importorskip("fastapi")
    from hf_delta.serving import Engine, EngineConfig, ServerThread, create_app

    engine = Engine(micro_base, config=EngineConfig(kv_cache_tokens=1024, block_size=4, max_running=16,
                                                    max_batch_tokens=64))
    records = [{"prompt": f"add {i} to 1 =", "completion": f" {i + 1}"} for i in range(6)]
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    with ServerThread(create_app(engine, fine_tuning_dir=tmp_path / "jobs")) as srv:
        url = srv.url + "/v1/fine_tuning/jobs"
        body = {"model": "base", "training_file": "train.jsonl", "suffix": "adder",
                "hyperparameters": {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 5},
                "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "output_dir": "out"}
        status, job = _call(url, "POST", body)
        assert status == 200, job
        assert job["object"] == "fine_tuning.job" and job["hyperparameters"]["learning_rate"] == pytest.approx(5e-3)
        deadline = time.monotonic() + 60
        while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.05)
            job = _call(f"{url}/{job['id']}")[1]
        assert job["status"] == "succeeded", job
        assert job["fine_tuned_model"] == "adder" and job["hf_delta"]["step"] == 4
        assert (tmp_path / "jobs" / "out" / "final" / "adapter_config.json").is_file()
        events = _call(f"{url}/{job['id']}/events")[1]["data"]
        assert [e["data"]["step"] for e in events] == [4, 3, 2, 1]
        assert all(e["data"]["train_loss"] > 0 for e in events)
        assert _call(srv.url + "/v1/completions", "POST", {"model": "adder", "prompt": "add 2 to 1 =",
                                                            "max_tokens": 3})[0] == 200
        assert [j["id"] for j in _call(url)[1]["data"]] == [job["id"]]
        # Cancel: a second, long job stops at a step boundary; the served models are untouched.
        status, long_job = _call(url, "POST", {**body, "suffix": "long", "hyperparameters": {"n_epochs": 50},
                                               "output_dir": "long"})
        assert status == 200
        cancelled = _call(f"{url}/{long_job['id']}/cancel", "POST")[1]
        assert cancelled["id"] == long_job["id"]
        while _call(f"{url}/{long_job['id']}")[1]["status"] not in ("cancelled", "succeeded"):
            time.sleep(0.05)
        assert _call(f"{url}/{long_job['id']}")[1]["status"] == "cancelled"
        assert "long" not in [m["id"] for m in _call(srv.url + "/v1/models")[1]["data"]]
        # Bad input.
        assert _call(url, "POST", {**body, "model": "org/other"})[0] == 404
        assert _call(url, "POST", {**body, "suffix": "x", "training_data": []})[0] == 400
        assert _call(url, "POST", {**body, "suffix": "adder"})[0] == 400  # already served
        assert _call(url, "POST", {**body, "suffix": "y", "lora": {"r": 4, "target_modules": ["nope"]}})[0] == 400
        assert _call(f"{url}/ftjob-missing")[0] == 404
        for outside in (str(tmp_path / "elsewhere"), "../escape", "a/../../b"):  # the server picks where jobs write
            status, err = _call(url, "POST", {**body, "suffix": "z", "output_dir": outside})
            assert status == 400 and "inside the server's fine-tuning directory" in err["error"]["message"]
        assert _call(url, "POST", {**body, "suffix": "../../z", "output_dir": None})[0] == 400
        assert _call(url, "POST", {**body, "suffix": "z", "training_file": "/etc/passwd"})[0] == 400
    engine.close()


def test_bench_coserve_writes_results(micro_zoo, tmp_path, torch_one_thread):
    from hf_delta.bench.coserve import CoserveSettings, bench_coserve

    settings = CoserveSettings(requests=4, rate=50.0, max_tokens=3, finetune_steps=2)
    md = bench_coserve(size="micro", zoo_dir=micro_zoo.root.parent, settings=settings, out=tmp_path / "results",
                       work_dir=tmp_path / "work", command="test")
    data = json.loads((tmp_path / "results" / "coserve-micro.json").read_text())
    rows = {r["system"]: r for r in data["rows"]}
    assert set(rows) == {"inference", "finetune", "coserve", "turns"}
    for system in ("inference", "coserve", "turns"):
        assert rows[system]["requests"] == 4 and rows[system]["tokens"] == 12
    assert rows["finetune"]["ft_steps"] == 2 and rows["coserve"]["ft_tokens"] > 0
    summary = data["meta"]["summary"]
    assert 0 < summary["activation_bytes_coserve"] < summary["activation_bytes_peft"]
    assert "| coserve |" in md
