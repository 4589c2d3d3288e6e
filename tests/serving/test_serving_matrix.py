"""The serving matrix: the engine serves tiny random-initialised models of every architecture in
``tests/_support/architectures.py`` with a delta, greedy output equal to ``DeltaModel.generate``, or refuses the
model at start-up with a message naming the feature.

Each model serves three requests in one batch (the delta, the base, the delta again on another prompt) whose
prompt plus completion is longer than the sliding window of the models that have one (Mistral's every layer,
Gemma 2/3's sliding layers), so windowed attention is what the engine must get right. Every row is compared
with ``DeltaModel.generate`` (greedy), the ``__base__`` row also with the plain transformers model's ``generate``.
The mixture-of-experts models of ``tests/_support/moe_models.py`` run the same matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from architectures import CONFIGS, SEQ_LEN, SLIDING_WINDOW, perturbed, sample_ids, tiny_model
from moe_models import CONFIGS as MOE
from moe_models import tiny_moe

from hf_delta import BitDeltaConfig, DeltaModel, compress
from hf_delta.errors import EngineConfigError
from hf_delta.serving.engine import Engine, EngineConfig, SamplingParams

NEW_TOKENS = 6
SMALL = EngineConfig(kv_cache_tokens=256, block_size=4, max_batch_tokens=64, max_running=8, device_slots=2, cpu_slots=2)


def _build(name: str) -> transformers.PreTrainedModel:
    return tiny_moe(name) if name in MOE else tiny_model(name)


def _prompts() -> list[list[int]]:
    ids = sample_ids(3, seq_len=SEQ_LEN, seed=7).tolist()
    return [ids[0], ids[1][: SEQ_LEN - 3], ids[2][: SEQ_LEN - 5]]


def _delta_folder(name: str, tmp_path: Path) -> Path:
    base = _build(name)  # compress wraps it: every use below builds its own copy (same seed, same weights)
    model = compress(base, perturbed(base, seed=1), BitDeltaConfig(distill_steps=0), progress=False)
    folder = tmp_path / f"{name}-delta"
    model.save_pretrained(folder)
    return folder


def _greedy(model, prompt: list[int], **kwargs) -> list[int]:
    """``model.generate``'s greedy continuation of ``prompt`` (a ``DeltaModel`` takes ``delta_names=[...]``)."""
    out = model.generate(
        input_ids=torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        **kwargs,
    )
    ids = out[0, len(prompt) :].tolist()
    assert len(ids) == NEW_TOKENS  # no end-of-sequence stop: the whole continuation is compared
    return ids


@pytest.mark.parametrize("name", [*sorted(CONFIGS), *sorted(MOE)])
def test_engine_serves_every_architecture_like_delta_model(name, byte_tokenizer, tmp_path, torch_one_thread):
    folder = _delta_folder(name, tmp_path)
    prompts = _prompts()
    models = ["ft", "__base__", "ft"]
    assert len(prompts[2]) + NEW_TOKENS > SLIDING_WINDOW
    engine = Engine(DeltaModel(_build(name)), tokenizer=byte_tokenizer, config=SMALL, deltas={"ft": folder})
    try:
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        results = engine.generate(prompts, model=models, params=params)
    finally:
        engine.close()
    reference = DeltaModel(_build(name))
    reference.load_delta(folder, "ft")
    want = [_greedy(reference, p, delta_names=[m]) for p, m in zip(prompts, models, strict=True)]
    assert [r.token_ids for r in results] == want
    plain = _build(name)  # the base rows are the plain model's too, not only DeltaModel's
    assert results[1].token_ids == _greedy(plain, prompts[1])
    # Tokens can agree while the numbers do not (a tiny random model often repeats a token): each generated token's
    # log-probability must be DeltaModel's too, from one forward over the prompt and the completion.
    for result, prompt, model in zip(results, prompts, models, strict=True):
        with torch.inference_mode():
            logits = reference(input_ids=torch.tensor([prompt + result.token_ids]), delta_names=[model]).logits[0]
        expected = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), dim=-1)
        expected = expected[torch.arange(NEW_TOKENS), result.token_ids]
        torch.testing.assert_close(torch.tensor([t.logprob for t in result.logprobs]), expected, atol=1e-4, rtol=0)


def _alibi_falcon():
    return transformers.FalconForCausalLM(
        transformers.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    ).eval()


# Architectures the engine refuses at start-up, and the feature its message must name.
REFUSED = {"falcon-alibi": (_alibi_falcon, r"FalconForCausalLM cannot be served.*ALiBi position bias")}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_engine_refuses_what_it_cannot_serve_at_start_up(name, byte_tokenizer):
    build, feature = REFUSED[name]
    with pytest.raises(EngineConfigError, match=feature):
        Engine(DeltaModel(build()), tokenizer=byte_tokenizer, config=SMALL)
