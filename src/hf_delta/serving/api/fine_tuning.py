"""OpenAI-style fine-tuning routes over an engine's ``CoServingTrainer`` (mounted by ``create_app``).

``POST /v1/fine_tuning/jobs`` (OpenAI's body: ``model``, ``training_file``, ``hyperparameters``, ``suffix``,
``seed``, ``method``; extensions: ``training_data`` inline records, ``lora`` as ``LoraConfig`` fields,
``output_dir``, ``hub_model_id``), ``GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``,
``GET .../events`` (the loss history as ``fine_tuning.job.event`` metrics), ``GET .../checkpoints`` and
``POST .../cancel``. ``training_file`` is a JSONL file in the server's fine-tuning directory (there is
no files API). The trained
adapter is served under ``suffix`` (or ``ft-<id>``) once the job succeeds. Answers name the job's folders
relative to the fine-tuning directory, and error messages name no server path (``errors.scrub_paths``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ...errors import BaseModelNotServedError, FineTuneConfigError, FineTuneJobNotFoundError
from ..training.trainer import CoServingTrainer
from .errors import error_response, from_exception, scrub_paths

DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
DEFAULT_LEARNING_RATE = 1e-3  # what learning_rate_multiplier multiplies


class FineTuningJobRequest(BaseModel):
    """``POST /v1/fine_tuning/jobs`` (unknown fields → 400 naming them; ``validation_file``, ``integrations`` and
    ``metadata`` → 400: no validation runs, no integrations, jobs are not tagged)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    training_file: str | None = None
    training_data: list[Any] | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: dict[str, Any] | None = None
    method: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    output_dir: str | None = None
    hub_model_id: str | None = None
    validation_file: str | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, Any] | None = None

    def refused(self) -> str | None:
        """The message refusing a field this server does not implement, if one is set."""
        for name in ("validation_file", "integrations", "metadata"):
            if getattr(self, name):
                return f"{name} is not supported by hf_delta's fine-tuning jobs; remove it from the request."
        return None

    def hyper(self) -> dict[str, Any]:
        """Hyperparameters from OpenAI's fields (``"auto"`` = default) plus hf_delta's own names."""
        given = dict(self.hyperparameters or {})
        method = (self.method or {}).get((self.method or {}).get("type", "supervised"), {})
        given.update(method.get("hyperparameters", {}) if isinstance(method, dict) else {})
        given = {k: v for k, v in given.items() if v != "auto"}
        if "learning_rate_multiplier" in given:
            given["learning_rate"] = DEFAULT_LEARNING_RATE * float(given.pop("learning_rate_multiplier"))
        if self.seed is not None:
            given["seed"] = self.seed
        return given


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return error_response(status, message, "invalid_request_error", code)


def _relative(root: Path, path: str) -> str:
    """``path`` as the client may see it: relative to the fine-tuning directory (else without its folders)."""
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return scrub_paths(path)


def _job(job, root: Path) -> dict[str, Any]:
    """The job's OpenAI object with the server's folders made relative to ``root`` and its error scrubbed."""
    out = job.to_openai()
    if out["error"]:
        out["error"] = {**out["error"], "message": scrub_paths(out["error"]["message"])}
    out["result_files"] = [_relative(root, f) for f in out["result_files"]]
    out["hf_delta"] = {**out["hf_delta"], "output_dir": _relative(root, out["hf_delta"]["output_dir"])}
    return out


def _answer(err: BaseException) -> JSONResponse:
    if isinstance(err, BaseModelNotServedError):
        return _error(404, str(err), "model_not_found")
    if isinstance(err, FineTuneJobNotFoundError):
        return _error(404, str(err), "fine_tuning_job_not_found")
    if isinstance(err, FineTuneConfigError):
        return _error(400, str(err))
    return from_exception(err)


def _inside(root: Path, folder: str) -> bool:
    """Whether ``folder`` is a relative path that stays inside ``root`` (no absolute paths, no ``..``)."""
    path = Path(folder)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


def fine_tuning_router(trainer: CoServingTrainer, *, output_root: str | Path | None = None) -> APIRouter:
    """The fine-tuning routes over ``trainer`` (already attached to its engine by ``create_app``)."""
    root = Path(output_root) if output_root else Path.home() / ".cache" / "hf_delta" / "fine_tuning"
    app = APIRouter()

    @app.post("/v1/fine_tuning/jobs")
    async def create_job(body: FineTuningJobRequest):
        if (refused := body.refused()) is not None:
            return _error(400, refused)
        data = body.training_data
        if data is None:
            if body.training_file is None:
                return _error(400, "Give training_file (a .jsonl file in the server's fine-tuning directory) or "
                                   "training_data (inline records).")
            if not _inside(root, body.training_file):
                return _error(400, f"training_file {body.training_file!r} must be a relative path inside the "
                                   "server's fine-tuning directory; or send the records as training_data.")
            data = root / body.training_file
        name = body.suffix
        folder = body.output_dir or name or uuid.uuid4().hex[:12]
        if not _inside(root, folder):
            return _error(400, f"output_dir {folder!r} must be a relative folder inside the server's fine-tuning "
                               "directory; the server decides where jobs write.")
        try:
            job = await run_in_threadpool(
                trainer.submit, lora=body.lora or DEFAULT_LORA, data=data, model=body.model,
                output_dir=root / folder, adapter_name=name, hyperparameters=body.hyper(),
                hub_model_id=body.hub_model_id)
        except Exception as err:
            return _answer(err)
        return _job(job, root)

    @app.get("/v1/fine_tuning/jobs")
    async def list_jobs(limit: int = 20) -> dict[str, Any]:
        jobs = trainer.list_jobs()
        return {"object": "list", "data": [_job(j, root) for j in jobs[:limit]], "has_more": len(jobs) > limit}

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    async def get_job(job_id: str):
        try:
            return _job(trainer.get(job_id), root)
        except Exception as err:
            return _answer(err)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def events(job_id: str):
        try:
            job = trainer.get(job_id)
        except Exception as err:
            return _answer(err)
        data = [{"object": "fine_tuning.job.event", "id": f"{job.id}-step-{h['step']}", "level": "info",
                 "created_at": int(job.created_at + h["time"]), "type": "metrics",
                 "message": f"Step {h['step']}/{job.steps_total}: training loss={h['loss']:.4f}",
                 "data": {"step": h["step"], "train_loss": h["loss"], "total_steps": job.steps_total}}
                for h in reversed(job.history)]
        return {"object": "list", "data": data, "has_more": False}

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def checkpoints(job_id: str):
        try:
            job = trainer.get(job_id)
        except Exception as err:
            return _answer(err)
        data = [{"object": "fine_tuning.job.checkpoint", "id": f"{job.id}-ckpt-{c['step']}",
                 "fine_tuning_job_id": job.id, "step_number": c["step"], "metrics": {"train_loss": c["loss"]},
                 "fine_tuned_model_checkpoint": _relative(root, c["path"])} for c in reversed(job.checkpoints)]
        return {"object": "list", "data": data, "has_more": False}

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        try:
            return _job(trainer.cancel(job_id), root)
        except Exception as err:
            return _answer(err)
    return app
