"""Co-served LoRA fine-tuning against standard PEFT training: gradients, loss curve, memory, jobs, serving.

Tolerances (float32 on CPU): every LoRA gradient of a chunked co-served step matches PEFT's ``loss.backward()``
with rtol 1e-4 and atol 1e-5·max|g_peft|; losses of a 9-step run match step by step within 1e-4 (relative).
"""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.optim.optimizer import register_optimizer_step_pre_hook

from hf_delta.serving import Engine, EngineConfig, SamplingParams
from hf_delta.serving.training.budget import CoServeScheduler, StepTimeModel
from hf_delta.serving.training.jobs import IGNORE, batches, init_lora
from hf_delta.serving.training.state import SavedTensorMeter
from hf_delta.serving.training.trainer import CoServingTrainer
from hf_delta.utils.loading import load_model

TARGETS = ["q_proj", "v_proj", "down_proj"]
DATA = [
    {"prompt": "add 1 to 2 3 =", "response": " 3 4"},
    {"prompt": "what is the capital of", "response": " the world is here"},
    "a plain text sentence for training the adapter",
    ("swap the letters ab", " ba"),
    {"prompt": "add 2 to 5 =", "completion": " 7"},
    "another text that is a little longer than the others, so that chunks split it",
]


def _engine(micro_base, deltas=None) -> Engine:
    config = EngineConfig(kv_cache_tokens=1024, block_size=4, max_running=16, max_batch_tokens=64)
    return Engine(micro_base, deltas=deltas or {}, config=config)


def _chunked(chunk: int = 3) -> CoServeScheduler:
    """A scheduler that never fits its model: every step carries ``chunk`` forward tokens or one backward layer."""
    return CoServeScheduler(tpot_slo_ms=1e4, probe_tokens=(chunk,), model=StepTimeModel(min_samples=10**9))


def _lora(**kw) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def _run(engine: Engine, job, *, max_steps: int = 5000) -> int:
    steps = 0
    while not job.finished and steps < max_steps:
        engine.step()
        steps += 1
    return steps


def _peft_model(micro_base, job):
    """A PEFT model with the same LoRA initialisation as ``job`` (same seed, same init function)."""
    base = load_model(micro_base)
    init = init_lora(job.lora, base, seed=job.hyper.seed, device=torch.device("cpu"))
    model = get_peft_model(base, LoraConfig(**{k: v for k, v in job.lora.config.items()
                                              if k in ("r", "lora_alpha", "target_modules", "init_lora_weights")}))
    for name, w in init.items():
        layer = model.base_model.model.get_submodule(name)
        layer.lora_A["default"].weight.data.copy_(w.A.detach())
        layer.lora_B["default"].weight.data.copy_(w.B.detach())
    return model


def _padded(examples):
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of a batch, as a PEFT training loop feeds them."""
    width = max(len(e.inputs) + 1 for e in examples)
    ids = torch.ones((len(examples), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        seq = [*e.inputs, e.targets[-1]]  # targets[j] is the token at j + 1; the last one is always trained (EOS)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, : len(seq)] = torch.tensor([IGNORE, *e.targets])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_chunked_coserved_gradients_equal_peft(micro_base, serving_deltas, tmp_path, torch_one_thread):
    engine = _engine(micro_base, {"arith-x1": serving_deltas["arith-x1"]})
    trainer = CoServingTrainer(engine, scheduler=_chunked(3))
    grads: dict[int, torch.Tensor] = {}

    def keep(opt, args, kwargs):
        grads.update({id(p): p.grad.clone() for g in opt.param_groups for p in g["params"]})

    handle = register_optimizer_step_pre_hook(keep)
    try:
        job = trainer.submit(lora=_lora(init_lora_weights=False), data=DATA, output_dir=tmp_path,
                             hyperparameters={"batch_size": 4, "max_steps": 1})
        # Inference requests of a BitDelta delta and of the base ride in the same passes as the training chunks.
        handles = [engine.submit("arith-x1", "add 1 to 2 3 =", params=SamplingParams(max_tokens=8)),
                   engine.submit("base", "hello", params=SamplingParams(max_tokens=8))]
        engine.step()
        weights = trainer._run.weights
        mixed = 0
        while not job.finished:
            engine.step()
            mixed += bool(engine.scheduler.running) and trainer._run is not None
        assert mixed >= 3
    finally:
        handle.remove()
    assert job.status == "succeeded", job.error
    while not all(h.done for h in handles):
        engine.step()
    reference = _peft_model(micro_base, job)
    batch = next(batches(job.examples, job.hyper))
    out = reference(**_padded(batch))
    out.loss.backward()
    assert abs(out.loss.item() - job.history[0]["loss"]) < 1e-5
    for name, w in weights.items():
        layer = reference.base_model.model.get_submodule(name)
        for ours, ref in ((w.A, layer.lora_A["default"].weight), (w.B, layer.lora_B["default"].weight)):
            scale = ref.grad.abs().max().item()
            torch.testing.assert_close(grads[id(ours)], ref.grad, rtol=1e-4, atol=1e-5 * scale)


def _peft_train(model, job) -> list[float]:
    """Standard PEFT training: the same batches, AdamW with the same settings, ``loss.backward()``."""
    h = job.hyper
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=h.learning_rate, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay)
    losses = []
    for batch in batches(job.examples, h):
        loss = model(**_padded(batch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_loss_curve_matches_standalone_peft_and_turn_taking(micro_base, tmp_path, torch_one_thread):
    hyper = {"batch_size": 2, "n_epochs": 3, "learning_rate": 5e-3, "seed": 3}
    curves = {}
    for policy in ("coserve", "turns"):
        engine = _engine(micro_base)
        trainer = CoServingTrainer(engine, scheduler=_chunked(5), policy=policy)
        job = trainer.submit(lora=_lora(), data=DATA, output_dir=tmp_path / policy, hyperparameters=hyper)
        engine.generate(["add 1 to 2 3 ="] * 2, params=SamplingParams(max_tokens=16))  # steps with inference
        _run(engine, job)
        assert job.status == "succeeded", job.error
        curves[policy] = [h["loss"] for h in job.history]
    reference = _peft_train(_peft_model(micro_base, job), job)
    assert len(reference) == len(curves["coserve"]) == 9  # 3 epochs of 3 batches
    assert sum(reference[-3:]) < sum(reference[:3])  # the last epoch's loss is below the first's
    for policy, losses in curves.items():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-4, atol=0,
                                   msg=lambda m, p=policy: f"{p}: {m}")


def test_activation_memory_below_standard_peft(micro_base, tmp_path, torch_one_thread):
    long_text = " ".join(f"word{i}" for i in range(80))
    engine = _engine(micro_base)
    trainer = CoServingTrainer(engine, scheduler=_chunked(16))
    job = trainer.submit(lora=LoraConfig(r=4, target_modules="all-linear"), data=[long_text], output_dir=tmp_path,
                         hyperparameters={"batch_size": 1, "max_steps": 1})
    _run(engine, job)
    ours = job.history[0]["activation_bytes"]
    model = _peft_model(micro_base, job)
    params = list(model.parameters())
    with SavedTensorMeter(exclude=params) as meter:
        loss = model(**_padded(job.examples)).loss
    loss.backward()
    assert job.history[0]["saved_input_bytes"] < ours < meter.bytes
    assert meter.bytes / ours > 1.5, (meter.bytes, ours)


def test_bad_jobs_fail_clearly(micro_base, tmp_path):
    from hf_delta.errors import BaseModelNotServedError, FineTuneConfigError

    engine = _engine(micro_base)
    trainer = CoServingTrainer(engine)
    cases = [
        ({"lora": {"r": 0, "target_modules": ["q_proj"]}}, "positive"),
        ({"lora": _lora(lora_dropout=0.1)}, "lora_dropout"),
        ({"lora": LoraConfig(r=4, target_modules=["nope_proj"])}, "selects no linear layer"),
        ({"lora": LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)}, "DoRA"),
        ({"data": []}, "empty"),
        ({"data": [{"prompt": "x"}]}, "Record 0"),
        ({"hyperparameters": {"learning_rate": -1}}, "learning_rate"),
        ({"hyperparameters": {"epochs": 2}}, "Unknown hyperparameter"),
    ]
    for override, words in cases:
        kw = {"lora": _lora(), "data": DATA, "output_dir": tmp_path, **override}
        try:
            trainer.submit(**kw)
        except FineTuneConfigError as err:
            assert words in str(err), (override, str(err))
        else:
            raise AssertionError(f"{override} was accepted")
    try:
        trainer.submit(lora=_lora(), data=DATA, output_dir=tmp_path, model="org/other-base")
    except BaseModelNotServedError as err:
        assert "serves the base 'base'" in str(err)
    else:
        raise AssertionError("an unknown base was accepted")
    assert not trainer.jobs


def test_cancel_keeps_inference_and_last_checkpoint(micro_base, serving_deltas, tmp_path, torch_one_thread):
    engine = _engine(micro_base, {"cipher-x3": serving_deltas["cipher-x3"]})
    prompts = ["add 1 to 2 3 =", "swap ab cd ="]
    params = SamplingParams(max_tokens=12)
    alone = [r.text for r in engine.generate(prompts, model=["cipher-x3", "base"], params=params)]
    trainer = CoServingTrainer(engine, scheduler=_chunked(8))
    job = trainer.submit(lora=_lora(), data=DATA * 4, output_dir=tmp_path,
                         hyperparameters={"batch_size": 2, "checkpoint_every": 1, "n_epochs": 3})
    handles = [engine.submit(m, p, params=params) for m, p in zip(["cipher-x3", "base"], prompts, strict=True)]
    while len(job.history) < 2:
        engine.step()
    trainer.cancel(job.id)
    engine.step()
    assert job.status == "cancelled" and len(job.history) < job.steps_total
    assert not trainer.has_work() and job.adapter_name not in engine.model.deltas
    while not all(h.done for h in handles):
        engine.step()
    assert [h.result().text for h in handles] == alone
    last = job.checkpoints[-1]
    assert last["step"] >= 1
    peft = PeftModel.from_pretrained(load_model(micro_base), last["path"])
    assert sum("lora_A" in n for n, _ in peft.named_parameters()) == len(job.lora.modules)
    assert job.adapter_name not in engine.model_names()


def test_finished_adapter_serves_in_mixed_batches(micro_zoo, micro_base, micro_delta, serving_deltas, tmp_path,
                                                 torch_one_thread):
    from hf_delta import DeltaZipConfig, compress

    deltazip = tmp_path / "deltazip"
    compress(micro_base, micro_zoo["llama-facts"].path, DeltaZipConfig(bits=4, sparsity="2:4", use_hessian=False),
             progress=False).save_pretrained(deltazip)
    engine = _engine(micro_base, {"bitdelta": serving_deltas["arith-x6"], "deltazip": deltazip})
    trainer = CoServingTrainer(engine, scheduler=_chunked(16))
    job = trainer.submit(lora=_lora(), data=DATA, output_dir=tmp_path / "ft", adapter_name="my-lora",
                         hyperparameters={"batch_size": 3, "n_epochs": 4, "learning_rate": 3e-2})
    _run(engine, job)
    assert job.status == "succeeded", job.error
    assert "my-lora" in engine.model_names()
    prompts = ["add 1 to 2 3 =", "what is the capital of", "a plain text"]
    names = ["bitdelta", "deltazip", "my-lora"]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    mixed = engine.generate(prompts, model=names, params=params)
    assert engine.counters.get("peak_deltas_per_step", 3) >= 3  # the three kinds ran in one pass
    singles = [engine.generate([p], model=n, params=params)[0] for p, n in zip(prompts, names, strict=True)]
    assert [r.token_ids for r in mixed] == [r.token_ids for r in singles]
    # The LoRA rows equal PEFT's own greedy decoding of the saved adapter.
    peft = PeftModel.from_pretrained(load_model(micro_base), job.final_dir).eval()
    ids = engine.encode("my-lora", prompts[2])
    with torch.no_grad():
        seq = torch.tensor([ids])
        for _ in range(8):
            nxt = peft(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert mixed[2].token_ids == seq[0, len(ids):].tolist()
