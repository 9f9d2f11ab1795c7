"""Files: their SHA-256, JSON read with one-line errors, and text or JSON written so that a reader
never sees half of it."""

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


def write_text_atomically(path: str, text: str, *, fsync: bool = False) -> None:
    """``text`` into ``path.tmp``, then renamed over ``path``: a reader sees the old file or the new one.

    ``fsync``: force the bytes to disk before the rename, for a file that must survive a crash
    of the machine once it exists (a checkpoint's manifest)."""
    temporary = path + ".tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_json_atomically(path: str, value, *, fsync: bool = False, **dump_options) -> None:
    """``json.dumps(value, **dump_options)`` written with ``write_text_atomically``."""
    write_text_atomically(path, json.dumps(value, **dump_options), fsync=fsync)


def read_json(path: str):
    """The JSON value in ``path``; a file that does not parse is a ValueError of one line naming it
    and where it breaks (a missing file stays FileNotFoundError, for the caller to word)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                         "the file is truncated or damaged") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not a JSON file") from None
