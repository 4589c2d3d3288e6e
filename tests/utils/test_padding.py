"""left_pad: rows end in the last column, the mask marks exactly the real tokens, an empty row is all padding."""

from __future__ import annotations

import torch

from hf_delta.utils.padding import left_pad


def test_rows_are_right_aligned_with_their_mask():
    ids, mask = left_pad([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long
    for row, (r, m) in zip([[5, 6, 7], [8], []], zip(ids, mask, strict=True), strict=True):
        assert r[m.bool()].tolist() == row
