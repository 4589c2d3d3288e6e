"""Fine-tuning jobs on the serving engine: LoRA settings, the dataset, the job record and its checkpoints.

A job is a PEFT ``LoraConfig`` (which modules, rank, alpha), a dataset (plain texts, or prompt/response pairs
whose loss counts only the response tokens), optimizer settings and a checkpoint folder. The engine's
``CoServingTrainer`` (``trainer.py``) runs it inside the inference steps. Every checkpoint folder is
both a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, ``PeftModel.from_pretrained``
loads it) and an hf_delta low-rank delta repo (``delta_config.json`` + ``delta_model.safetensors``, which the
engine serves), written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...config import CompressionRecord
from ...errors import FineTuneConfigError
from ...fingerprint import base_fingerprint
from ...integrations.peft import export_peft_lora
from ...methods.lowrank import LowRankConfig, LowRankWeight
from ...storage import Delta
from ...utils.io import atomic_directory, atomic_write_text

logger = logging.getLogger(__name__)

IGNORE = -100
STATE_NAME = "trainer_state.json"
_UNSUPPORTED = {  # LoraConfig fields whose non-default values co-serving cannot honour, and why
    "use_dora": "DoRA is not supported; set use_dora=False",
    "modules_to_save": "modules_to_save is not supported (only LoRA factors are trained); remove it",
    "layers_to_transform": "layers_to_transform is not supported; select layers with target_modules instead",
    "rank_pattern": "rank_pattern is not supported; use one r for every target module",
    "alpha_pattern": "alpha_pattern is not supported; use one lora_alpha for every target module",
}


@dataclass
class Hyperparameters:
    """Optimizer and schedule settings of a fine-tuning job (AdamW, constant learning rate).

    Args:
        n_epochs: passes over the dataset.
        batch_size: sequences per optimizer step (the loss is the mean over their trained tokens).
        learning_rate, weight_decay, betas, eps: AdamW settings.
        max_grad_norm: clip the LoRA gradients to this norm before each step (``None``: no clipping).
        max_steps: stop after this many optimizer steps (``None``: ``n_epochs`` decide).
        max_length: longest training sequence in tokens (longer ones are cut).
        checkpoint_every: write a checkpoint every this many optimizer steps (0: only the final adapter).
        seed: seeds the LoRA initialisation and the data order.
    """

    n_epochs: int = 1
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    max_grad_norm: float | None = None
    max_steps: int | None = None
    max_length: int = 256
    checkpoint_every: int = 0
    seed: int = 0

    def validate(self) -> None:
        ints = {"n_epochs": self.n_epochs, "batch_size": self.batch_size, "max_length": self.max_length}
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise FineTuneConfigError(f"{name} must be a positive integer, got {value!r}.")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise FineTuneConfigError(f"max_steps must be a positive integer or None, got {self.max_steps!r}.")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise FineTuneConfigError(f"learning_rate must be > 0, e.g. 1e-3; got {self.learning_rate!r}.")
        if self.weight_decay < 0 or self.checkpoint_every < 0:
            raise FineTuneConfigError("weight_decay and checkpoint_every must be >= 0.")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise FineTuneConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}.")


@dataclass
class LoraSpec:
    """The parts of a PEFT ``LoraConfig`` co-serving uses, resolved against the served base model."""

    r: int
    alpha: float
    scaling: float
    modules: list[str]
    init: str | bool
    config: dict[str, Any]


def resolve_lora(lora: Any, base_model: nn.Module) -> LoraSpec:
    """Check a ``peft.LoraConfig`` (or a dict of its fields) and find its target modules in ``base_model``.

    Raises:
        FineTuneConfigError: the config is malformed, uses a LoRA variant co-serving does not run, or
            selects no linear layer inside the decoder blocks.
    """
    from peft import LoraConfig

    if isinstance(lora, Mapping):
        try:
            lora = LoraConfig(**lora)
        except (TypeError, ValueError) as err:
            raise FineTuneConfigError(f"Invalid LoRA config {dict(lora)}: {err}") from err
    if not isinstance(lora, LoraConfig):
        raise FineTuneConfigError(f"lora must be a peft.LoraConfig or a dict of its fields, got {type(lora).__name__}.")
    if not isinstance(lora.r, int) or lora.r < 1:
        raise FineTuneConfigError(f"LoRA rank r must be a positive integer, e.g. 8; got {lora.r!r}.")
    if lora.lora_alpha is None or lora.lora_alpha <= 0:
        raise FineTuneConfigError(f"lora_alpha must be > 0, e.g. 2 * r; got {lora.lora_alpha!r}.")
    for name, why in _UNSUPPORTED.items():
        if getattr(lora, name, None):
            raise FineTuneConfigError(f"LoraConfig.{name}={getattr(lora, name)!r}: {why}.")
    if lora.lora_dropout:
        raise FineTuneConfigError(
            f"lora_dropout={lora.lora_dropout} is not supported: a co-served sequence's forward runs in chunks "
            "and its backward recomputes each layer, and both must see the same values; set lora_dropout=0.0.")
    if lora.bias != "none":
        raise FineTuneConfigError(f"bias={lora.bias!r} is not supported; only LoRA factors are trained (bias='none').")
    if lora.init_lora_weights not in (True, False, "gaussian"):
        raise FineTuneConfigError(f"init_lora_weights={lora.init_lora_weights!r} is not supported; use True "
                                  "(Kaiming A, zero B), 'gaussian' or False.")
    modules = _targets(lora.target_modules, base_model)
    scaling = lora.lora_alpha / (math.sqrt(lora.r) if lora.use_rslora else lora.r)
    return LoraSpec(r=lora.r, alpha=float(lora.lora_alpha), scaling=scaling, modules=modules,
                    init=lora.init_lora_weights,
                    config=json.loads(json.dumps(lora.to_dict(), default=lambda v: sorted(v) if isinstance(v, set)
                                                 else str(v))))


def linear_modules(base_model: nn.Module) -> dict[str, nn.Linear]:
    """``{plain name: nn.Linear}`` of the linear layers inside decoder blocks, seen through delta wrappers."""
    layers = {id(m) for m in base_model.get_decoder().layers}
    out: dict[str, nn.Linear] = {}
    inside: list[str] = []
    for name, module in base_model.named_modules():
        if id(module) in layers:
            inside.append(name + ".")
        if isinstance(module, nn.Linear) and any(name.startswith(p) for p in inside):
            out[name.replace(".base_layer", "")] = module
    return out


def _targets(target_modules: Any, base_model: nn.Module) -> list[str]:
    linear = linear_modules(base_model)
    if target_modules is None:
        raise FineTuneConfigError("LoraConfig.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'.")
    if target_modules == "all-linear":
        picked = sorted(linear)
    elif isinstance(target_modules, str):
        import re

        picked = sorted(n for n in linear if re.fullmatch(target_modules, n))
    else:
        wanted = set(target_modules)
        picked = sorted(n for n in linear if n in wanted or n.rpartition(".")[2] in wanted)
    if not picked:
        leaves = sorted({n.rpartition(".")[2] for n in linear})
        raise FineTuneConfigError(f"target_modules={target_modules!r} selects no linear layer of the decoder "
                                  f"blocks; this base has {leaves} (or use 'all-linear').")
    return picked


def init_lora(spec: LoraSpec, base_model: nn.Module, *, seed: int, device: torch.device,
              dtype: torch.dtype = torch.float32) -> dict[str, LowRankWeight]:
    """Fresh trainable LoRA factors for every target module (PEFT's initialisations, seeded)."""
    gen = torch.Generator().manual_seed(seed)
    linear = linear_modules(base_model)
    weights = {}
    for name in spec.modules:
        layer = linear[name]
        a = torch.empty(spec.r, layer.in_features)
        if spec.init == "gaussian":
            a.normal_(0.0, 1.0 / spec.r, generator=gen)
        else:
            bound = 1.0 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=sqrt(5)) as nn.Linear/PEFT do
            a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(layer.out_features, spec.r)
        if spec.init is False:
            b.normal_(0.0, 0.02, generator=gen)
        weights[name] = LowRankWeight((layer.out_features, layer.in_features),
                                      a.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_(),
                                      spec.scaling)
    return weights


# ---------------------------------------------------------------------------------------------- dataset
@dataclass
class Example:
    """One tokenized training sequence: model inputs and the next-token target of each (``-100`` = no loss)."""

    inputs: list[int]
    targets: list[int]

    @property
    def num_trained(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def read_records(data: Any) -> list[Any]:
    """Records of ``data``: a list (texts, dicts, pairs) or a JSONL file path (one JSON value per line)."""
    if isinstance(data, (str, Path)) and str(data).endswith((".jsonl", ".json")):
        path = Path(data)
        if not path.is_file():
            raise FineTuneConfigError(f"Training file {str(path)!r} does not exist.")
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        try:
            return [json.loads(ln) for ln in lines]
        except json.JSONDecodeError as err:
            raise FineTuneConfigError(f"{path} is not JSONL (one JSON object per line): {err}") from err
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise FineTuneConfigError("The dataset must be a list of texts, of {'prompt', 'response'} pairs, or a "
                                  f".jsonl path; got {type(data).__name__}.")
    return list(data)


def tokenize_dataset(data: Any, tokenizer, *, max_length: int) -> list[Example]:
    """Tokenize texts (every token trained) or prompt/response pairs (only response tokens trained).

    A record is a string, ``{"text": ...}``, ``{"prompt": ..., "response"|"completion": ...}`` or a
    ``(prompt, response)`` pair. Each sequence ends with the end-of-sequence token and is cut to
    ``max_length + 1`` tokens.

    Raises:
        FineTuneConfigError: the dataset is empty, a record has another shape, or nothing is left to train.
    """
    records = read_records(data)
    if not records:
        raise FineTuneConfigError("The dataset is empty; give at least one text or prompt/response pair.")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for i, rec in enumerate(records):
        prompt, response = _split_record(rec, i)
        if prompt is None:
            ids = tokenizer(response)["input_ids"] + eos
            first = 1
        else:
            p = tokenizer(prompt)["input_ids"]
            ids = p + tokenizer(response, add_special_tokens=False)["input_ids"] + eos
            first = len(p)
        ids = ids[: max_length + 1]
        targets = [t if j + 1 >= first else IGNORE for j, t in enumerate(ids[1:])]
        if len(ids) >= 2 and any(t != IGNORE for t in targets):
            out.append(Example(ids[:-1], targets))
    if not out:
        raise FineTuneConfigError(f"None of the {len(records)} records has a token to train on after tokenizing "
                                  f"and cutting to max_length={max_length}; give longer responses or raise it.")
    return out


def _split_record(rec: Any, i: int) -> tuple[str | None, str]:
    if isinstance(rec, str):
        return None, rec
    if isinstance(rec, Mapping):
        if "text" in rec:
            return None, str(rec["text"])
        response = rec.get("response", rec.get("completion"))
        if "prompt" in rec and response is not None:
            return str(rec["prompt"]), str(response)
    elif isinstance(rec, Sequence) and len(rec) == 2 and all(isinstance(x, str) for x in rec):
        return rec[0], rec[1]
    raise FineTuneConfigError(f"Record {i} must be a text, {{'text': ...}}, {{'prompt': ..., 'response': ...}} or a "
                              f"(prompt, response) pair; got {str(rec)[:80]!r}.")


def batches(examples: Sequence[Example], hyper: Hyperparameters) -> Iterator[list[Example]]:
    """The job's optimizer batches: ``n_epochs`` seeded shuffles cut into ``batch_size`` (last one may be short)."""
    rng = random.Random(hyper.seed)
    steps = 0
    for _ in range(hyper.n_epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for k in range(0, len(order), hyper.batch_size):
            if hyper.max_steps is not None and steps >= hyper.max_steps:
                return
            yield [examples[j] for j in order[k : k + hyper.batch_size]]
            steps += 1


def total_steps(num_examples: int, hyper: Hyperparameters) -> int:
    steps = math.ceil(num_examples / hyper.batch_size) * hyper.n_epochs
    return min(steps, hyper.max_steps) if hyper.max_steps is not None else steps


# ------------------------------------------------------------------------------------------------- jobs
@dataclass(eq=False)
class FineTuneJob:
    """One fine-tuning job as the engine tracks it (statuses as OpenAI's: queued, running, succeeded,
    failed, cancelled). ``history`` holds ``{"step", "loss", "tokens", "time"}`` per optimizer step."""

    adapter_name: str
    base: str
    lora: LoraSpec
    hyper: Hyperparameters
    examples: list[Example]
    output_dir: Path
    hub_model_id: str | None = None
    id: str = field(default_factory=lambda: f"ftjob-{uuid.uuid4().hex[:24]}")
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    trained_tokens: int = 0
    cancel_requested: bool = False
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def steps_total(self) -> int:
        return total_steps(len(self.examples), self.hyper)

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def wait(self, timeout: float | None = None) -> FineTuneJob:
        """Block until the job ends (the engine must be stepping in another thread)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"Fine-tuning job {self.id} did not finish within {timeout} s.")
        return self

    def _end(self, status: str, error: str | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, time.time()
        self._done.set()

    @property
    def final_dir(self) -> Path:
        return self.output_dir / "final"

    def to_openai(self) -> dict[str, Any]:
        """The job as OpenAI's ``fine_tuning.job`` object (plus ``hf_delta`` extras: steps, loss)."""
        error = {"code": "job_failed", "message": self.error, "param": None} if self.error else None
        return {
            "id": self.id, "object": "fine_tuning.job", "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None, "model": self.base,
            "fine_tuned_model": self.adapter_name if self.status == "succeeded" else None,
            "organization_id": "hf_delta", "status": self.status, "error": error, "seed": self.hyper.seed,
            "hyperparameters": {"n_epochs": self.hyper.n_epochs, "batch_size": self.hyper.batch_size,
                                "learning_rate": self.hyper.learning_rate},
            "training_file": None, "validation_file": None, "trained_tokens": self.trained_tokens,
            "result_files": [str(self.final_dir)] if self.status == "succeeded" else [],
            "method": {"type": "supervised"},
            "hf_delta": {"step": len(self.history), "total_steps": self.steps_total,
                         "loss": self.history[-1]["loss"] if self.history else None,
                         "lora": {"r": self.lora.r, "lora_alpha": self.lora.alpha,
                                  "target_modules": self.lora.modules},
                         "output_dir": str(self.output_dir)},
        }


# ------------------------------------------------------------------------------------------ checkpoints
def adapter_delta(weights: Mapping[str, LowRankWeight], spec: LoraSpec, base_model: nn.Module,
                  fingerprint: dict[str, Any]) -> Delta:
    """A frozen copy of trained LoRA factors as an hf_delta low-rank ``Delta`` (what the engine serves)."""
    frozen = {n: LowRankWeight(w.shape, w.A.detach().clone(), w.B.detach().clone(), w.scaling)
              for n, w in weights.items()}
    config = LowRankConfig(rank=spec.r, factor_dtype="float32", target_modules=list(spec.modules))
    record = CompressionRecord(base_model_name_or_path=getattr(base_model, "name_or_path", None) or None,
                               base_fingerprint=fingerprint)
    return Delta(config=config, record=record, weights=frozen,
                 vocab_size=base_model.get_input_embeddings().weight.shape[0])


def save_adapter(delta: Delta, base_model: nn.Module, folder: str | Path, *, state: dict[str, Any]) -> Path:
    """Write ``folder`` atomically as a PEFT adapter + hf_delta delta repo + ``trainer_state.json``."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        delta.save_pretrained(tmp)
        export_peft_lora(delta, base_model, tmp)
        atomic_write_text(tmp / STATE_NAME, json.dumps(state, indent=2))
    return folder


def base_fingerprint_of(model) -> dict[str, Any]:
    """The fingerprint of a ``DeltaModel``'s unwrapped base (recorded in every saved adapter)."""
    return base_fingerprint(model.base_state_dict())


def push_adapter(folder: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                 commit_message: str = "Upload LoRA adapter trained with hf_delta co-serving") -> str:
    """Upload a saved adapter folder (PEFT + delta repo files) to the Hub; returns the commit sha."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message).oid


def job_state(job: FineTuneJob) -> dict[str, Any]:
    """What ``trainer_state.json`` records: settings, progress and the loss history."""
    return {"job_id": job.id, "adapter_name": job.adapter_name, "step": len(job.history),
            "total_steps": job.steps_total, "trained_tokens": job.trained_tokens, "history": job.history,
            "hyperparameters": asdict(job.hyper), "lora": job.lora.config}


def hyperparameters_from(fields: Mapping[str, Any]) -> Hyperparameters:
    """``Hyperparameters`` from a dict of its fields; raises ``FineTuneConfigError`` naming an unknown one."""
    try:
        return Hyperparameters(**fields)
    except TypeError as err:
        known = sorted(Hyperparameters.__dataclass_fields__)
        raise FineTuneConfigError(f"Unknown hyperparameter in {sorted(fields)}; known: {known}.") from err
