"""SHA-256 checksums of the files a delta repo writes, as ``"sha256:<hex>"`` strings.

They are taken while a file is written (no second read) and checked against the bytes a load reads anyway
(a small file) or in bounded chunks (a large one), so a flipped byte in a tensor is an error, not a wrong model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ALGORITHM = "sha256"
_CHUNK_BYTES = 8 * 2**20


def digest(hasher: hashlib._Hash) -> str:
    """The recorded form of a finished hash: ``"sha256:<hex>"``."""
    return f"{hasher.name}:{hasher.hexdigest()}"


def new_hasher() -> hashlib._Hash:
    return hashlib.new(ALGORITHM)


def bytes_checksum(data: bytes | memoryview) -> str:
    """The checksum of bytes already in memory."""
    return digest(hashlib.new(ALGORITHM, data))


def file_checksum(path: str | Path) -> str:
    """The checksum of a file, read in 8 MiB chunks (memory stays flat whatever the file's size)."""
    hasher = new_hasher()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            hasher.update(view[:n])
    return digest(hasher)
