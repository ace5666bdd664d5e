"""The one sha256 helper: files are hashed in chunks, so a large artifact never sits in memory."""
from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(*parts: bytes | str) -> str:
    """sha256 of the parts in order (str parts are UTF-8 encoded)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()
