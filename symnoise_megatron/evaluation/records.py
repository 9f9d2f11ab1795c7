"""Reading evaluation files: a JSON array of objects (AlpacaEval's format) or JSON Lines."""

from __future__ import annotations

import json
from typing import List


def read_records(path: str, field: str) -> List[dict]:
    """The objects of ``path``, each required to have a string ``field`` (named by row if not)."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    bad = [number for number, row in enumerate(rows, start=1) if not isinstance(row, dict) or not isinstance(row.get(field), str)]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} have no string {field!r}")
    return rows
