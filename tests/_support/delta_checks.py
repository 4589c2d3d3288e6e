"""One check that a saved delta works everywhere a delta is used: loaded beside other deltas, in a mixed batch
(each row equal to its delta alone), merged into the base, through the serving engine, and through the Triton
kernels (interpreted on CPU). New methods and mixed-method deltas run it instead of copying its parts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from kernel_helpers import TRITON_DEVICES

from hf_delta import DeltaModel
from hf_delta.evaluation import greedy_generate
from hf_delta.storage import Delta
from hf_delta.utils.loading import load_model, load_tokenizer


def _logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits


def check_delta_serves(
    base_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch, *, engine: bool = True
) -> None:
    """Every check above for the deltas ``folders`` (name → saved repo) of one base."""
    names = list(folders)
    model = DeltaModel(load_model(base_path).eval())
    for name, folder in folders.items():
        model.load_delta(folder, delta_name=name)
    ids = torch.randint(3, 300, (len(names) + 1, 9), generator=torch.Generator().manual_seed(3))
    rows = [*names, "__base__"]
    mixed = _logits(model, ids, delta_names=rows)
    solo = {}
    for row, name in enumerate(names):
        model.set_delta(name)
        solo[name] = _logits(model, ids)
        torch.testing.assert_close(mixed[row], solo[name][row], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(mixed[-1], _logits(load_model(base_path).eval(), ids)[-1], rtol=1e-5, atol=1e-5)

    # The Triton path (interpreted on CPU) gives the same mixed batch.
    if TRITON_DEVICES == ["cpu"]:
        with monkeypatch.context() as m:
            m.setenv("HF_DELTA_KERNELS", "triton")
            kernel = _logits(model, ids, delta_names=rows)
        err = (kernel - mixed).abs().max() / mixed.abs().max()
        assert err < 1e-5, f"kernel path differs from the reference: max relative error {err:.2e}"

    # Merged into a plain transformers model: the same logits as the delta applied on the fly.
    for name in names:
        merging = DeltaModel(load_model(base_path).eval())
        merging.add_delta(name, Delta.from_folder(folders[name]))
        merged = merging.merge_and_unload(name)
        torch.testing.assert_close(_logits(merged, ids), solo[name], rtol=1e-4, atol=1e-4, msg=name)

    if not engine:
        return
    from hf_delta.serving import Engine, EngineConfig, SamplingParams

    tokenizer = load_tokenizer(base_path)
    prompts = ["add 1 to 1 2 3 =", "encode a b c =", "def f(x):"]
    served = Engine(base_path, deltas=folders, config=EngineConfig(kv_cache_tokens=1024, block_size=8))
    try:
        jobs = [(n, p) for n in names for p in prompts]
        results = served.generate([p for _, p in jobs], model=[n for n, _ in jobs], params=SamplingParams(max_tokens=6))
    finally:
        served.close()
    for (name, prompt), result in zip(jobs, results, strict=True):
        model.set_delta(name)
        with torch.inference_mode():
            expected = greedy_generate(model, tokenizer, [prompt], max_new_tokens=6)[0]
        assert result.text == expected, (name, prompt)
