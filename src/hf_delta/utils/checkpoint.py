"""Read a model's safetensors checkpoint one tensor at a time, in bounded memory.

``Checkpoint`` resolves a local folder or a Hub snapshot, single-file or sharded, and reads each tensor with
plain file reads into a tensor of its own dtype: no memory map stays open, so reading a 13 GB checkpoint
tensor by tensor keeps the process at the size of the tensors held, not of the files touched.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .checksums import digest, new_hasher

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorInfo:
    """Where one tensor lies in its file: dtype, shape and byte range."""

    __slots__ = ("dtype", "end", "path", "shape", "start")

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, end: int):
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which hf_delta cannot read "
                                 f"(it reads {sorted(_DTYPES)}).")
        start, end = info["data_offsets"]
        out[name] = TensorInfo(path, _DTYPES[info["dtype"]], tuple(info["shape"]), base + start, base + end)
    return out


class Checkpoint:
    """The tensors of a safetensors checkpoint folder (``model.safetensors`` or shards with an index).

    >>> ckpt = Checkpoint("path/to/model")  # doctest: +SKIP
    >>> ckpt.info("model.embed_tokens.weight").shape, ckpt.get("model.norm.weight").dtype  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / SAFE_WEIGHTS_INDEX_NAME
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.folder / SAFE_WEIGHTS_NAME).is_file():
            files = [SAFE_WEIGHTS_NAME]
        else:
            raise ModelLoadError(f"{self.folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.")
        self._infos: dict[str, TensorInfo] = {}
        for name in files:
            self._infos.update(_read_header(self.folder / name))

    @staticmethod
    def has_safetensors(folder: str | Path) -> bool:
        folder = Path(folder)
        return (folder / SAFE_WEIGHTS_INDEX_NAME).is_file() or (folder / SAFE_WEIGHTS_NAME).is_file()

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` in its stored dtype (read from disk now; the caller owns the memory)."""
        info = self._infos[name]
        raw = torch.empty(info.end - info.start, dtype=torch.uint8)
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.start)
            view = memoryview(raw.numpy())
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ModelLoadError(f"{info.path} is truncated: tensor {name!r} ends past the end of the file.")
                done += got
        return raw.view(info.dtype).reshape(info.shape)

    def nbytes(self) -> int:
        """Bytes of all tensors in the checkpoint."""
        return sum(i.end - i.start for i in self._infos.values())


_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], *,
                      metadata: dict[str, str] | None = None) -> str:
    """Write ``tensors`` as a safetensors file, one tensor at a time (``safetensors.torch.save_file`` first
    copies every tensor into one bytes object: a second copy of a 7B model's 850 MB delta).

    Returns:
        The file's checksum (``utils.checksums``), hashed from the bytes as they are written.
    """
    names = sorted(tensors)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise ValueError(f"write_safetensors: tensor {name!r} has dtype {t.dtype}, which it does not write.")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    hasher = new_hasher()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            hasher.update(chunk)
        for name in names:
            t = tensors[name].detach().to("cpu").contiguous()
            if t.numel():
                data = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                f.write(data)
                hasher.update(data)
    return digest(hasher)
