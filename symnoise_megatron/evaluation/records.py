"""Reading evaluation files: a JSON array of objects (AlpacaEval's format) or JSON Lines."""

from __future__ import annotations

import json
import os
import random
from typing import List, Tuple


def read_records(path: str, field: str) -> List[dict]:
    """The objects of ``path``, each required to have a string ``field`` (named by row if not)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    bad = [number for number, row in enumerate(rows, start=1) if not isinstance(row, dict) or not isinstance(row.get(field), str)]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} have no string {field!r}")
    return rows


def split_records(rows: List[dict], held_out: int, seed: int) -> Tuple[List[dict], List[dict]]:
    """(train, held-out): a seeded shuffle, ``held_out`` rows set aside, each part in file order."""
    if not 0 < held_out < len(rows):
        raise ValueError(f"cannot hold out {held_out} of {len(rows)} rows")
    chosen = set(random.Random(seed).sample(range(len(rows)), held_out))
    return ([row for i, row in enumerate(rows) if i not in chosen], [row for i, row in enumerate(rows) if i in chosen])


def write_records(rows: List[dict], path: str) -> None:
    """A JSON array, written atomically."""
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=1, ensure_ascii=False)
    os.replace(temporary, path)
