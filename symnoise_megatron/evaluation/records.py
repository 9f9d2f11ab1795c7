"""Reading evaluation files: a JSON array of objects (AlpacaEval's format), JSON Lines or Parquet."""

from __future__ import annotations

import json
import random
from typing import List, Tuple

from symnoise_megatron.common.files import write_text_atomically


def meta_path(output_path: str) -> str:
    """Where a generated outputs file's generator record lies (symnoise-generate writes it, symnoise-inspect
    reads it). Not ``.json``: a glob such as outputs/*.json must find the answers only."""
    return output_path + ".meta"


def _parse(path: str, text: str) -> list:
    """The file's rows; a parse error names the file and where in it the JSON breaks."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {number} is not JSON ({error.msg}); expected a JSON array of objects "
                             "(AlpacaEval's format) or one JSON object per line") from None
    return rows


def read_records(path: str, field: str, allow_empty: bool = False) -> List[dict]:
    """The objects of ``path``, each required to have a string ``field``; an offending row is
    named with what is wrong (no such key, a null value, another type). A file without rows is
    an error unless ``allow_empty``."""
    if path.lower().endswith(".parquet"):
        from symnoise_megatron.data.readers import read_rows

        rows = [raw.payload for raw in read_rows(path)]
        text = "rows" if rows else ""
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
                             "expected a JSON array of objects, JSON Lines or a .parquet file") from None
        rows = _parse(path, text)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON array of objects, got a JSON {type(rows).__name__}")
    if not rows and not allow_empty:
        raise ValueError(f"{path}: the file has no rows" + (" (it is empty)" if not text.strip() else ""))
    problems = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            problems.append(f"row {number} is a JSON {type(row).__name__}, not an object")
        elif field not in row:
            problems.append(f"row {number} has no {field!r} key")
        elif row[field] is None:
            problems.append(f"row {number} has {field!r}: null")
        elif not isinstance(row[field], str):
            problems.append(f"row {number} has a {type(row[field]).__name__} {field!r}, not a string")
    if problems:
        more = f" (and {len(problems) - 3} more rows)" if len(problems) > 3 else ""
        raise ValueError(f"{path}: " + "; ".join(problems[:3]) + more)
    return rows


def split_records(rows: List[dict], held_out: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """(train, held-out): a seeded shuffle, ``held_out`` rows set aside, each part in file order."""
    if not 0 < held_out < len(rows):
        raise ValueError(f"cannot hold out {held_out} of {len(rows)} rows")
    chosen = set(random.Random(seed).sample(range(len(rows)), held_out))
    return ([row for i, row in enumerate(rows) if i not in chosen], [row for i, row in enumerate(rows) if i in chosen])


def records_text(value) -> str:
    """The JSON text the evaluation files hold (AlpacaEval's indented, non-ASCII kept)."""
    return json.dumps(value, indent=1, ensure_ascii=False)


def write_json(value, path: str) -> None:
    """JSON, written atomically (a reader never sees half a file)."""
    write_text_atomically(path, records_text(value))


def write_records(rows: List[dict], path: str) -> None:
    """A JSON array, written atomically."""
    write_json(rows, path)
