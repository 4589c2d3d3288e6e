"""lm-evaluation-harness on a delta (``hf_delta.integrations.lm_eval``) against lm-eval's own ``hf`` model.

The tasks are the micro zoo's own, written as local YAML files over a local JSONL file (no download): multiple
choice (loglikelihood), generation until the end of sequence, and rolling loglikelihood. A delta through
``hf-delta`` must score what its merged fine-tune scores through ``hf``, and ``__base__`` what the base scores.

Tolerance: a delta is applied on the fly (``x @ W_base.T + x @ D.T``) while the merged model computes
``x @ (W_base + D).T``; in float32 the two differ by rounding only, about one unit in the last place per matmul
(measured: ≤ 6e-6 on log-likelihoods of about -22, i.e. 3e-7 relative). A relative tolerance of 1e-5 on each
log-likelihood (30x that) still tells a delta from its base by six orders of magnitude (they differ by > 1 nat);
accuracies and exact match, which only compare such values or generated strings, must be identical.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

TASKS = ["zoo_arith_choice", "zoo_arith_generate", "zoo_arith_perplexity"]
REL = 1e-5


@pytest.fixture(scope="module")
def local_datasets(tmp_path_factory):
    """``datasets`` caches the JSONL tasks under a temporary folder and never asks the Hub."""
    import datasets.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("datasets"))
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def arith(micro_zoo, micro_delta, tmp_path_factory, local_datasets):
    """The llama-arith pieces: base folder, delta folder, merged fine-tune folder, task folder, tokenizer."""
    from hf_delta import DeltaModel
    from hf_delta.integrations.lm_eval_tasks import write_zoo_tasks
    from hf_delta.utils.loading import load_tokenizer

    entry = micro_zoo["llama-arith"]
    base, delta = micro_zoo[entry.base].path, micro_delta("llama-arith")
    tokenizer = load_tokenizer(entry.path)
    tasks = tmp_path_factory.mktemp("lm-eval-tasks")
    assert write_zoo_tasks(micro_zoo.task("llama-arith"), tokenizer, tasks) == TASKS
    merged = tmp_path_factory.mktemp("merged")
    DeltaModel.from_pretrained(base, delta).merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)
    return {"base": base, "delta": delta, "merged": merged, "tasks": tasks, "tokenizer": tokenizer}


def _evaluate(lm, tasks: Path, names=TASKS) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=TaskManager(include_path=str(tasks)), log_samples=True, verbosity="ERROR"
    )


def _responses(result: dict, task: str) -> list:
    """Every request's raw answer, in document order: (loglikelihood, is_greedy), a rolling loglikelihood or text."""
    docs = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for doc in docs for r in doc["resps"]]


def _loglikelihoods(result: dict, task: str) -> torch.Tensor:
    return torch.tensor(
        [r[0] if isinstance(r, list | tuple) else r for r in _responses(result, task)], dtype=torch.float64
    )


@pytest.fixture(scope="module")
def results(arith, torch_one_thread_module):
    from lm_eval.models.huggingface import HFLM

    from hf_delta.integrations.lm_eval import DeltaLM

    a = arith
    return {
        "delta": _evaluate(
            DeltaLM(base=str(a["base"]), delta=str(a["delta"]), delta_name="arith", batch_size=8), a["tasks"]
        ),
        "merged": _evaluate(HFLM(pretrained=str(a["merged"]), device="cpu", batch_size=8), a["tasks"]),
        "delta_base": _evaluate(
            DeltaLM(base=str(a["base"]), delta=str(a["delta"]), delta_name="__base__", batch_size=8), a["tasks"]
        ),
        "base": _evaluate(
            HFLM(pretrained=str(a["base"]), tokenizer=a["tokenizer"], device="cpu", batch_size=8), a["tasks"]
        ),
    }


@pytest.fixture(scope="module")
def torch_one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _scores(result: dict) -> dict[str, float]:
    return {
        f"{task}:{key}": value
        for task, values in result["results"].items()
        for key, value in values.items()
        if "," in key and "_stderr" not in key
    }


def test_the_zoo_task_is_local_yaml_over_a_local_jsonl(micro_zoo, arith):
    task = micro_zoo.task("llama-arith")
    config = yaml.safe_load((arith["tasks"] / "zoo_arith_choice.yaml").read_text())
    assert config["dataset_path"] == "json" and config["tag"] == ["zoo_arith"]
    data = Path(config["dataset_kwargs"]["data_files"]["test"])
    assert data.is_absolute() and data.parent == arith["tasks"]
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    assert [(d["prompt"], d["answer"]) for d in docs] == [(ex.prompt, ex.answer) for ex in task.heldout]
    for d in docs:
        assert len(set(d["choices"])) == 4 and d["choices"][d["label"]] == d["answer"]
    generate = yaml.safe_load((arith["tasks"] / "zoo_arith_generate.yaml").read_text())
    longest = max(len(arith["tokenizer"](ex.answer, add_special_tokens=False)["input_ids"]) for ex in task.heldout)
    assert generate["output_type"] == "generate_until"
    assert generate["generation_kwargs"]["max_gen_toks"] == longest + 1


def test_a_delta_through_hf_delta_scores_like_its_merged_fine_tune_through_hf(results):
    delta, merged = results["delta"], results["merged"]
    assert _scores(delta).keys() == _scores(merged).keys()
    for key, value in _scores(delta).items():
        if "perplexity" in key or "bits_per_byte" in key:
            assert value == pytest.approx(_scores(merged)[key], rel=REL), key
        else:  # accuracy / exact match: the same decisions
            assert value == _scores(merged)[key], key
    for task in ("zoo_arith_choice", "zoo_arith_perplexity"):
        ours, theirs = _loglikelihoods(delta, task), _loglikelihoods(merged, task)
        assert torch.allclose(ours, theirs, rtol=REL, atol=0), (ours - theirs).abs().max()
        # The delta is applied: its base scores the same requests more than a nat apart.
        assert (ours - _loglikelihoods(results["base"], task)).abs().max() > 1.0
    assert _responses(delta, "zoo_arith_generate") == _responses(merged, "zoo_arith_generate")


def test_base_through_hf_delta_scores_like_the_base_through_hf(results):
    assert _scores(results["delta_base"]) == _scores(results["base"])
    for task in ("zoo_arith_choice", "zoo_arith_perplexity"):
        # "__base__" rows run the base layers alone: the very same arithmetic as the plain base.
        assert torch.equal(_loglikelihoods(results["delta_base"], task), _loglikelihoods(results["base"], task))
    assert _responses(results["delta_base"], "zoo_arith_generate") == _responses(results["base"], "zoo_arith_generate")


def test_lm_eval_loglikelihoods_match_a_direct_computation(arith, results):
    """The first document's choices, scored by hand on the merged fine-tune: sum of log p(answer token | prefix)."""
    from hf_delta.utils.loading import load_model

    model, tokenizer = load_model(arith["merged"]), arith["tokenizer"]
    doc = sorted(results["delta"]["samples"]["zoo_arith_choice"], key=lambda s: s["doc_id"])[0]["doc"]
    expected = []
    for choice in doc["choices"]:
        context = tokenizer(doc["prompt"], add_special_tokens=False)["input_ids"]
        continuation = tokenizer(doc["prompt"] + choice, add_special_tokens=False)["input_ids"][len(context) :]
        with torch.no_grad():
            logits = model(torch.tensor([context + continuation])).logits[0].double()
        logp = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
        expected.append(logp[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
    got = _loglikelihoods(results["delta"], "zoo_arith_choice")[: len(expected)]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=REL, atol=0)
    assert not math.isclose(max(expected), min(expected))


def test_generate_until_applies_the_delta(micro_zoo, micro_delta, tmp_path, local_datasets, torch_one_thread):
    """On llama-facts (whose greedy text differs from its base's) generation through hf-delta is the merged one's."""
    from lm_eval.models.huggingface import HFLM

    from hf_delta import DeltaModel
    from hf_delta.integrations.lm_eval import DeltaLM
    from hf_delta.integrations.lm_eval_tasks import write_zoo_tasks
    from hf_delta.utils.loading import load_tokenizer

    entry = micro_zoo["llama-facts"]
    base, delta, tokenizer = (
        str(micro_zoo[entry.base].path),
        str(micro_delta("llama-facts")),
        load_tokenizer(entry.path),
    )
    write_zoo_tasks(micro_zoo.task("llama-facts"), tokenizer, tmp_path)
    task = ["zoo_facts_generate"]
    merged = HFLM(
        pretrained=DeltaModel.from_pretrained(base, delta).merge_and_unload(), tokenizer=tokenizer, batch_size=8
    )
    texts = {
        name: _responses(_evaluate(lm, tmp_path, task), task[0])
        for name, lm in (
            ("delta", DeltaLM(base=base, delta=delta, delta_name="facts", batch_size=8)),
            ("merged", merged),
            ("base", DeltaLM(base=base, delta_name="__base__", batch_size=8)),
        )
    }
    assert texts["delta"] == texts["merged"]
    assert texts["delta"] != texts["base"]  # 5 of the 24 answers differ


def test_requests_are_batched_into_one_forward_pass_per_batch(arith, torch_one_thread):
    from hf_delta.integrations.lm_eval import DeltaLM

    lm = DeltaLM(base=str(arith["base"]), delta=str(arith["delta"]), delta_name="arith", batch_size=8)
    rows: list[int] = []
    lm.model.base_model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append((args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True
    )
    result = _evaluate(lm, arith["tasks"], ["zoo_arith_choice"])
    requests = sum(len(doc["resps"]) for doc in result["samples"]["zoo_arith_choice"])
    assert requests == 4 * 32 and max(rows) == 8
    assert len(rows) == math.ceil(requests / 8)


def test_delta_lm_says_what_is_missing():
    from hf_delta.errors import DeltaNotFoundError, ModelLoadError
    from hf_delta.integrations.lm_eval import DeltaLM

    with pytest.raises(ModelLoadError, match="needs base="):
        DeltaLM(delta="org/delta")
    with pytest.raises(ModelLoadError, match="needs delta="):
        DeltaLM(base="org/base")
    model = _tiny_delta_model()
    with pytest.raises(DeltaNotFoundError, match="nope"):
        DeltaLM(model=model, delta_name="nope")


def _tiny_delta_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_delta import DeltaModel

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return DeltaModel(LlamaForCausalLM(config))


def test_lm_eval_scores_flattens_the_results(arith, results, torch_one_thread):
    from hf_delta import DeltaModel
    from hf_delta.integrations.lm_eval import lm_eval_scores

    model = DeltaModel.from_pretrained(arith["base"], arith["delta"], delta_name="arith")
    scores = lm_eval_scores(model, arith["tokenizer"], ["zoo_arith"], include_path=arith["tasks"], batch_size=8)
    expected = results["delta"]["results"]
    assert scores["zoo_arith_choice:acc"] == expected["zoo_arith_choice"]["acc,none"]
    assert scores["zoo_arith_generate:exact_match (strip)"] == expected["zoo_arith_generate"]["exact_match,strip"]
    assert scores["zoo_arith_perplexity:word_perplexity"] == pytest.approx(
        expected["zoo_arith_perplexity"]["word_perplexity,none"], rel=REL
    )
    assert not any("stderr" in key for key in scores)


@pytest.mark.slow
def test_the_command_line_runs_lm_eval_with_the_hf_delta_model(arith, results, tmp_path):
    """``hf-delta lm-eval --model hf-delta --model_args base=...,delta=...,delta_name=...``, as a user types it."""
    a = arith
    argv = [
        "lm-eval",
        "--model",
        "hf-delta",
        "--model_args",
        f"base={a['base']},delta={a['delta']},delta_name=arith",
        "--tasks",
        "zoo_arith_choice",
        "--include_path",
        str(a["tasks"]),
        "--batch_size",
        "8",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "hf_delta.cli.main", *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(written.read_text())["results"]["zoo_arith_choice"]
    expected = results["delta"]["results"]["zoo_arith_choice"]
    assert (got["acc,none"], got["acc_norm,none"]) == (expected["acc,none"], expected["acc_norm,none"])


def test_bench_fidelity_adds_lm_eval_scores_of_the_compressed_model_its_fine_tune_and_base(
    micro_zoo, arith, local_datasets, torch_one_thread
):
    from hf_delta.bench.fidelity import run_fidelity
    from hf_delta.integrations.lm_eval import lm_eval_scores
    from hf_delta.utils.loading import load_model

    [row] = run_fidelity(
        "micro",
        micro_zoo.root.parent,
        settings=["bitdelta-initial"],
        finetunes=["llama-arith"],
        lm_eval_tasks=["zoo"],
        lm_eval_limit=8,
    )
    assert row["retention"] is None  # the micro fine-tune scores its base's 0 exact match: undefined, not a crash
    tasks = ["zoo_arith_choice", "zoo_arith_perplexity"]
    for suffix, folder in ((" ft", micro_zoo["llama-arith"].path), (" base", arith["base"])):
        expected = lm_eval_scores(load_model(folder), arith["tokenizer"], tasks, include_path=arith["tasks"], limit=8)
        assert row[f"zoo_choice:acc{suffix}"] == expected["zoo_arith_choice:acc"]
        assert row[f"zoo_perplexity:bits_per_byte{suffix}"] == expected["zoo_arith_perplexity:bits_per_byte"]
    # bitdelta-initial is micro_delta's setting: the row's compressed model is the fixture's delta.
    delta = lm_eval_scores(_delta_model(arith), arith["tokenizer"], tasks, include_path=arith["tasks"], limit=8)
    assert row["zoo_choice:acc"] == delta["zoo_arith_choice:acc"]
    assert row["zoo_perplexity:bits_per_byte"] == pytest.approx(delta["zoo_arith_perplexity:bits_per_byte"], rel=REL)
    assert "zoo_generate:exact_match (strip)" in row


def _delta_model(arith):
    from hf_delta import DeltaModel

    return DeltaModel.from_pretrained(arith["base"], arith["delta"])


@pytest.mark.parametrize("name", ["qwen2-arith", "llama-chat"])
def test_tied_heads_and_carried_tokenizers(micro_zoo, micro_delta, tmp_path, local_datasets, torch_one_thread, name):
    """Qwen2 ties its head to the embedding (HFLM's re-tying must not touch the wrapped head); llama-chat's delta
    carries its own tokenizer (three added chat tokens), which DeltaLM picks up by itself."""
    from lm_eval.models.huggingface import HFLM

    from hf_delta import DeltaModel
    from hf_delta.integrations.lm_eval import DeltaLM
    from hf_delta.integrations.lm_eval_tasks import write_zoo_tasks
    from hf_delta.utils.loading import load_tokenizer

    entry = micro_zoo[name]
    base, delta, tokenizer = str(micro_zoo[entry.base].path), str(micro_delta(name)), load_tokenizer(entry.path)
    task = write_zoo_tasks(micro_zoo.task(name), tokenizer, tmp_path)[0]
    lm = DeltaLM(base=base, delta=delta, delta_name="ft", batch_size=8)
    assert lm.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert "tie_weights" not in vars(lm.model.base_model)
    merged = HFLM(
        pretrained=DeltaModel.from_pretrained(base, delta).merge_and_unload(), tokenizer=tokenizer, batch_size=8
    )
    ours, theirs = (_evaluate(m, tmp_path, [task]) for m in (lm, merged))
    assert _scores(ours) == _scores(theirs)
    assert torch.allclose(_loglikelihoods(ours, task), _loglikelihoods(theirs, task), rtol=REL, atol=0)
