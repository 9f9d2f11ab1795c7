"""Files: their SHA-256, and JSON written so that a reader never sees half of it."""

from __future__ import annotations

import hashlib
import json
import os

HASH_CHUNK_BYTES = 16 << 20


def sha256_of_file(path: str) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (checkpoint shards run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomically(path: str, value, *, fsync: bool = False, **dump_options) -> None:
    """``json.dump(value, **dump_options)`` into ``path.tmp``, then renamed over ``path``.

    ``fsync``: force the bytes to disk before the rename, for a file that must survive a crash
    of the machine once it exists (a checkpoint's manifest)."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, **dump_options)
        if fsync:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(temporary, path)
