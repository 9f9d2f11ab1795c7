"""Response statistics of the papers' Table 4: length, repetition, diversity, log-diversity.

Two definitions (``definition=``):

``paper`` (default) is the procedure behind the published numbers: NEFTune's Table 4 (which
SymNoise's reuses) was computed with ``watermark_reliability_release/metrics/repetition_diversity.py``
of Kirchenbauer et al.'s lm-watermarking repository (after SimCTG's ``eval_text``). It is
reproduced here exactly, with its two bugs, so that our figures can be compared with theirs:

- A response is ``text.strip().split()`` (case and punctuation kept), cut to its first K words
  (Alpaca 50, Evol-Instruct 100, ShareGPT 150, OpenPlatypus 150). Responses with fewer than
  K words are left out of repetition and diversity, not out of the lengths.
- Bug 1, off by one: n-grams are collected while ``end < len(words)``, so K words give K - n
  n-grams, not K - n + 1: the last n-gram is never counted.
- Per response, rep_n = 1 - unique / total (a fraction) for n = 2, 3, 4.
- Bug 2, double division: per response, diversity = (1 - rep_2/100)(1 - rep_3/100)(1 - rep_4/100);
  the fraction is divided by 100 again (SimCTG's code took percentages). So 1 - diversity is
  about (rep_2 + rep_3 + rep_4) / 100, and diversity is close to 1 for any text.
- Per response, log_diversity = -ln(max(1 - diversity, e^-20)): a response without a repeated
  n-gram scores exactly 20, and one whose 50 words repeat a single 2-gram 8.5 (3.9 under
  ``standard``).
- Reported: rep-2 in percent (100 x the mean of the per-response fractions), rep-3 and rep-4
  as mean fractions, the mean per-response diversity and the mean per-response log-diversity.

``standard`` is the measure those formulas describe: K - n + 1 n-grams of the K-word prefix,
diversity = (1 - rep_2)(1 - rep_3)(1 - rep_4) per response, log_diversity =
-ln(max(1 - diversity, e^-cap)) per response (``log_diversity_cap``, default 20, the same cap
as the paper's), means over the counted responses as above.

Under both, avg_chars and avg_words are means over all responses, whole (words are
whitespace tokens). This module's earlier versions took log-diversity of the *mean*
repetition rates, -ln(1 - prod(1 - mean rep_n)), which is neither (issue 16: about 3.8 on
AlpacaEval answers of the kind for which the papers report about 16).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

from symnoise_megatron.evaluation.records import read_records

WORDS_PER_DATASET = {"alpaca": 50, "evol_instruct": 100, "sharegpt": 150, "open_platypus": 150}
DEFINITIONS = ("paper", "standard")
PAPER_LOG_DIVERSITY_CAP = 20.0
NGRAMS = (2, 3, 4)


def read_outputs(path: str) -> List[str]:
    """The ``output`` texts of AlpacaEval's model-outputs JSON (or JSONL); an empty file is an error."""
    return [row["output"] for row in read_records(path, "output")]


def check_words(words: int, definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown definition {definition!r}; use one of {', '.join(DEFINITIONS)}")
    if words < 4:
        raise ValueError(f"K (--words) must be at least 4 for 4-grams, got {words}")
    if definition == "paper" and words < 5:
        raise ValueError("K (--words) must be at least 5 under --definition paper: its n-gram loop "
                         f"gives K - 4 4-grams, none for K = {words}")


def ngram_counts(words: List[str], n: int, definition: str = "standard") -> Tuple[int, int]:
    """(distinct, total) n-grams of ``words``; ``paper`` leaves out the last one (see above)."""
    stop = len(words) - n + (0 if definition == "paper" else 1)
    grams = [tuple(words[i:i + n]) for i in range(max(stop, 0))]
    return len(set(grams)), len(grams)


def repetition(words: List[str], n: int, definition: str = "standard") -> float:
    """1 - distinct / total n-grams, a fraction."""
    distinct, total = ngram_counts(words, n, definition)
    if total == 0:
        raise ValueError(f"{len(words)} words have no {n}-grams under the {definition!r} definition")
    return 1.0 - distinct / total


def response_scores(prefix: List[str], definition: str = "paper",
                    log_diversity_cap: float = PAPER_LOG_DIVERSITY_CAP) -> Dict[str, float]:
    """rep_2, rep_3, rep_4 (fractions), diversity and log_diversity of one K-word prefix."""
    reps = {n: repetition(prefix, n, definition) for n in NGRAMS}
    scale = 100.0 if definition == "paper" else 1.0  # the paper's second division by 100
    diversity = math.prod(1.0 - reps[n] / scale for n in NGRAMS)
    cap = PAPER_LOG_DIVERSITY_CAP if definition == "paper" else log_diversity_cap
    floor = math.exp(-cap)
    gap = max(1.0 - diversity, floor)
    return {"rep_2": reps[2], "rep_3": reps[3], "rep_4": reps[4], "diversity": diversity,
            "log_diversity": -math.log(gap) if gap > 0 else math.inf}


@dataclass
class ResponseMetrics:
    file: str
    responses: int
    counted: int
    avg_chars: float
    avg_words: float
    rep_2: Optional[float]  # percent
    rep_3: Optional[float]  # fraction
    rep_4: Optional[float]  # fraction
    diversity: Optional[float]
    log_diversity: Optional[float]
    definition: str = "paper"
    log_diversity_cap: float = PAPER_LOG_DIVERSITY_CAP

    def to_dict(self) -> dict:
        return asdict(self)


def response_metrics(texts: List[str], words: int, name: str = "", definition: str = "paper",
                     log_diversity_cap: float = PAPER_LOG_DIVERSITY_CAP) -> ResponseMetrics:
    """The statistics of ``texts`` with K = ``words`` under ``definition`` (module docstring).

    Repetition and diversity are None when no response has K words; no responses at all is
    an error (there is nothing to average)."""
    check_words(words, definition)
    if not texts:
        raise ValueError(f"{name or 'the outputs'}: no responses to measure")
    if definition == "paper":
        log_diversity_cap = PAPER_LOG_DIVERSITY_CAP
    elif not log_diversity_cap > 0:
        raise ValueError(f"the log-diversity cap must be positive, got {log_diversity_cap}")
    split = [text.strip().split() for text in texts]
    scores = [response_scores(w[:words], definition, log_diversity_cap) for w in split if len(w) >= words]
    means = {key: (statistics.fmean(s[key] for s in scores) if scores else None)
             for key in ("rep_2", "rep_3", "rep_4", "diversity", "log_diversity")}
    return ResponseMetrics(
        file=name, responses=len(texts), counted=len(scores),
        avg_chars=statistics.fmean(len(t) for t in texts), avg_words=statistics.fmean(len(w) for w in split),
        rep_2=100.0 * means["rep_2"] if scores else None, rep_3=means["rep_3"], rep_4=means["rep_4"],
        diversity=means["diversity"], log_diversity=means["log_diversity"],
        definition=definition, log_diversity_cap=log_diversity_cap,
    )


COLUMNS = ["file", "responses", "counted", "avg_chars", "avg_words", "rep_2", "rep_3", "rep_4", "diversity",
           "log_diversity", "definition"]


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
    writer = csv.DictWriter(out, list(ResponseMetrics.__dataclass_fields__))
    writer.writeheader()
    for row in rows:
        writer.writerow(row.to_dict())
    return out.getvalue()
