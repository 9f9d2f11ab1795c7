"""Input files -> raw rows, each with the file and row number that error messages name.

JSON Lines and JSON arrays are read here line by line, so a malformed line is reported (or
skipped) by its number without losing the rest of the file: ``datasets``' JSON loader fails
the whole file on one bad line and names no row. Parquet files and saved ``datasets``
directories are read through ``datasets``.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, List, NamedTuple, Optional, Sequence, Union


class RawRow(NamedTuple):
    """A row before parsing: a JSON line's bytes (JSONL; decoded, UTF-8, in the worker), an
    already-decoded object, or the error that makes the row bad."""

    source: str
    row: int  # 1-based: the line of a JSONL file, the element of a JSON array or table
    payload: Union[bytes, str, dict, Exception]


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Files and ``datasets`` directories named by paths or globs, in the order given."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"--input {pattern}: no such file or directory")
        paths.extend(matches)
    _refuse_repeated_inputs(paths)
    return paths


def _refuse_repeated_inputs(paths: Sequence[str]) -> None:
    """A file named twice (directly, through a glob or a link) would be read once while the
    meta lists it twice: the outputs keyed by path would not say what was tokenized."""
    seen = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in seen:
            also = "" if seen[real] == path else f" (also given as {seen[real]})"
            raise ValueError(f"--input {path} is given twice{also}; name each input file once")
        seen[real] = path


def input_kind(path: str) -> str:
    if os.path.isdir(path):
        return "datasets"
    lower = path.lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    if lower.endswith(".json"):
        with open(path, "rb") as handle:
            head = handle.read(4096).lstrip()
        return "json" if head.startswith(b"[") else "jsonl"
    raise ValueError(f"{path}: unknown input type (expected .json, .jsonl, .parquet or a datasets directory)")


def _table_rows(path: str, split: Optional[str]) -> Iterator[RawRow]:
    import datasets

    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            name = split or ("train" if "train" in data else next(iter(data)))
            if name not in data:
                raise ValueError(f"{path}: no split {name!r} (has {', '.join(data)})")
            data = data[name]
    else:
        data = datasets.Dataset.from_parquet(path)
    for index, record in enumerate(data, start=1):
        yield RawRow(path, index, record)


def _has_undecodable(value) -> bool:
    """Strings holding bytes that were not UTF-8 (kept as lone surrogates by surrogateescape)."""
    if isinstance(value, str):
        return any("\udc80" <= c <= "\udcff" for c in value)
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _json_array_rows(path: str) -> Iterator[RawRow]:
    from symnoise_megatron.data.formats import RowError

    with open(path, "rb") as handle:
        data = handle.read()
    try:
        text, clean = data.decode("utf-8-sig"), True
    except UnicodeDecodeError:
        # Decoded anyway, so that the rows holding the bad bytes are named (and can be skipped).
        text, clean = data.decode("utf-8-sig", errors="surrogateescape"), False
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: malformed JSON at line {error.lineno}, column {error.colno}: {error.msg}") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got {type(records).__name__}")
    for index, record in enumerate(records, start=1):
        if not clean and _has_undecodable(record):
            record = RowError("not_utf8", "not UTF-8: the row holds bytes that are not UTF-8 text")
        yield RawRow(path, index, record)


def _jsonl_rows(path: str) -> Iterator[RawRow]:
    # Bytes: each worker decodes its own lines, and a line that is not UTF-8 is a bad row
    # like any other (named, or skipped and counted), not an error that stops the reader.
    with open(path, "rb") as handle:
        for index, line in enumerate(handle, start=1):
            if line.strip():
                yield RawRow(path, index, line)


def count_rows(path: str) -> Optional[int]:
    """Rows in a file, cheaply where possible (for the progress bar)."""
    kind = input_kind(path)
    if kind == "jsonl":
        with open(path, "rb") as handle:
            return sum(1 for line in handle if line.strip())
    return None


def read_rows(path: str, split: Optional[str] = None) -> Iterator[RawRow]:
    kind = input_kind(path)
    if kind == "jsonl":
        return _jsonl_rows(path)
    if kind == "json":
        return _json_array_rows(path)
    return _table_rows(path, split)


def decode_row(raw: RawRow) -> dict:
    """The JSON object a raw row holds; a :class:`RowError` naming what is wrong otherwise."""
    from symnoise_megatron.data.formats import RowError

    if isinstance(raw.payload, dict):
        return raw.payload
    if isinstance(raw.payload, Exception):
        raise raw.payload
    try:
        value = json.loads(raw.payload)
    except json.JSONDecodeError as error:
        raise RowError("malformed_json", f"malformed JSON: {error.msg} at column {error.colno}") from None
    except UnicodeDecodeError as error:
        raise RowError("not_utf8", f"not UTF-8: byte {error.object[error.start]:#04x} at column {error.start + 1}") from None
    if not isinstance(value, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def first_record(path: str, split: Optional[str] = None) -> dict:
    """The first decodable row of a file, for format detection."""
    from symnoise_megatron.data.formats import RowError

    for raw in read_rows(path, split):
        if isinstance(raw.payload, Exception):
            continue
        try:
            return decode_row(raw)
        except RowError:
            continue
    raise ValueError(f"{path}: no JSON object found to detect the format from")
