"""utils/checkpoint.py: the safetensors reader and writer agree with the safetensors library, every dtype."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from hf_delta.utils.checkpoint import Checkpoint, write_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=gen),
        "c::signs": torch.randint(0, 256, (2, 4, 3), dtype=torch.uint8, generator=gen),
        "d": torch.randn(2, 2, generator=gen).to(torch.float16),
        "e": torch.arange(6, dtype=torch.int64).reshape(2, 3)[:, 1:],  # not contiguous
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False, True]),
    }


def test_written_files_read_back_with_the_safetensors_library_and_our_reader(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors, metadata={"format": "pt"})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert theirs.keys() == tensors.keys()
    for name, t in tensors.items():
        assert theirs[name].dtype == t.dtype and torch.equal(theirs[name], t)


def test_the_reader_reads_files_the_library_wrote(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.keys()) == set(tensors)
    for name, t in tensors.items():
        got = ckpt.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t) and ckpt.info(name).shape == tuple(t.shape)
