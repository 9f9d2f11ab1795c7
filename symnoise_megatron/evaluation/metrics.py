"""The paper's response statistics (SymNoise Table 4): length, repetition, log-diversity.

For each response, ``words`` is ``text.split()`` (whitespace tokens) and its prefix is the
first K words, with K per data set as the paper's section 4.5.1 sets it. Responses shorter
than K words are excluded from the repetition and diversity figures (not from the lengths).

- rep-n of a response = 1 - (distinct n-grams) / (all K-n+1 n-grams of its K-word prefix);
  ``rep_n`` is its mean over the counted responses (Li et al. 2022; SimCTG). ``rep_2`` is
  reported in percent, as in Table 4; ``rep_3`` and ``rep_4`` as fractions.
- diversity = (1 - rep_2) x (1 - rep_3) x (1 - rep_4), from those means.
- log-diversity = -log(1 - diversity) (Kirchenbauer et al. 2023).
- avg_chars / avg_words: mean characters / whitespace words over all responses, whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional

from symnoise_megatron.evaluation.records import read_records

WORDS_PER_DATASET = {"alpaca": 50, "evol_instruct": 100, "sharegpt": 150, "open_platypus": 150}


def read_outputs(path: str) -> List[str]:
    """The ``output`` texts of AlpacaEval's model-outputs JSON (or JSONL)."""
    return [row["output"] for row in read_records(path, "output")]


def repetition(words: List[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


@dataclass
class ResponseMetrics:
    file: str
    responses: int
    counted: int
    avg_chars: float
    avg_words: float
    rep_2: Optional[float]
    rep_3: Optional[float]
    rep_4: Optional[float]
    diversity: Optional[float]
    log_diversity: Optional[float]

    def to_dict(self) -> dict:
        return asdict(self)


def response_metrics(texts: List[str], words: int, name: str = "") -> ResponseMetrics:
    if words < 4:
        raise ValueError(f"the prefix must have at least 4 words for 4-grams, got {words}")
    split = [text.split() for text in texts]
    counted = [w[:words] for w in split if len(w) >= words]
    reps = {n: (sum(repetition(w, n) for w in counted) / len(counted) if counted else None) for n in (2, 3, 4)}
    diversity = log_diversity = None
    if counted:
        diversity = math.prod(1.0 - reps[n] for n in (2, 3, 4))
        log_diversity = -math.log(1.0 - diversity) if diversity < 1.0 else math.inf
    return ResponseMetrics(
        file=name, responses=len(texts), counted=len(counted),
        avg_chars=sum(len(t) for t in texts) / len(texts) if texts else 0.0,
        avg_words=sum(len(w) for w in split) / len(split) if split else 0.0,
        rep_2=100.0 * reps[2] if reps[2] is not None else None, rep_3=reps[3], rep_4=reps[4],
        diversity=diversity, log_diversity=log_diversity,
    )


COLUMNS = ["file", "responses", "counted", "avg_chars", "avg_words", "rep_2", "rep_3", "rep_4", "diversity", "log_diversity"]


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def to_markdown(rows: List[ResponseMetrics]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(getattr(r, c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def to_csv(rows: List[ResponseMetrics]) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_dict())
    return out.getvalue()
