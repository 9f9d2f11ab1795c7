"""Read training logs (Megatron-LM's line format) and put several runs side by side.

Runs that share a name are seeds of one setting: the table and the plots show their mean
and spread, and say whether a setting's validation loss differs from the first setting's
by more than the seeds' own spread (|difference| > 2 x its standard error).
"""

from __future__ import annotations

import math
import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from symnoise_megatron.evaluation.metrics import DEFINITIONS, response_metrics

_TRAIN = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.eE+-]+|nan|inf) \|")
_VALID = re.compile(r"validation loss at iteration (\d+) \| lm loss value: ([0-9.eE+-]+|nan|inf) \|")


@dataclass
class Run:
    name: str
    train: Dict[int, float] = field(default_factory=dict)
    validation: Dict[int, float] = field(default_factory=dict)
    outputs: Optional[List[str]] = None


def read_log(path: str, name: str) -> Run:
    run = Run(name)
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if match := _TRAIN.search(line):
                run.train[int(match.group(1))] = float(match.group(2))
            elif match := _VALID.search(line):
                run.validation[int(match.group(1))] = float(match.group(2))
    if not run.train:
        raise ValueError(f"{path}: no 'iteration N/ M | ... | lm loss: X |' lines found")
    return run


def group_runs(runs: Sequence[Run]) -> Dict[str, List[Run]]:
    """Runs by name, in first-seen order: one entry per setting, one run per seed."""
    groups: Dict[str, List[Run]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run)
    return groups


@dataclass
class Spread:
    mean: float
    sd: float  # sample standard deviation over seeds; 0 for one seed
    n: int

    @classmethod
    def of(cls, values) -> Optional["Spread"]:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return cls(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))

    def __str__(self):
        return f"{self.mean:.4g}" if self.n == 1 else f"{self.mean:.4g} ± {self.sd:.2g}"


def difference_verdict(value: Optional[Spread], baseline: Optional[Spread]) -> str:
    """The difference of two settings' means, and whether the seeds' spread covers it."""
    if value is None or baseline is None:
        return "-"
    delta = value.mean - baseline.mean
    if value.n < 2 or baseline.n < 2:
        return f"{delta:+.3g} (one seed: no spread)"
    error = math.sqrt(value.sd ** 2 / value.n + baseline.sd ** 2 / baseline.n)
    verdict = "within seed noise" if abs(delta) <= 2 * error else "beyond seed noise"
    return f"{delta:+.3g} ({verdict})"


@dataclass
class SettingSummary:
    name: str
    seeds: int
    train_loss: Optional[Spread]
    final_validation: Optional[Spread]
    best_validation: Optional[Spread]
    avg_words: Optional[Spread]
    rep_2: Dict[str, Optional[Spread]]  # by definition: "paper", "standard"
    log_diversity: Dict[str, Optional[Spread]]


def summarize(runs: List[Run], words: int) -> SettingSummary:
    metrics = {definition: [response_metrics(run.outputs, words, run.name, definition) for run in runs if run.outputs]
               for definition in DEFINITIONS}
    return SettingSummary(
        name=runs[0].name, seeds=len(runs),
        train_loss=Spread.of(run.train[max(run.train)] for run in runs),
        final_validation=Spread.of(run.validation[max(run.validation)] if run.validation else None for run in runs),
        best_validation=Spread.of(min(run.validation.values()) if run.validation else None for run in runs),
        avg_words=Spread.of(m.avg_words for m in metrics["paper"]),
        rep_2={d: Spread.of(m.rep_2 for m in metrics[d]) for d in DEFINITIONS},
        log_diversity={d: Spread.of(m.log_diversity for m in metrics[d]) for d in DEFINITIONS},
    )


def summary_table(runs: List[Run], words: int) -> str:
    """One row per setting; rep-2 and log-diversity under both definitions (paper first: the
    published tables' procedure; see evaluation/metrics.py), each the mean over seeds of the
    per-seed means over responses."""
    summaries = [summarize(group, words) for group in group_runs(runs).values()]
    baseline = summaries[0]
    header = ["setting", "seeds", "final train loss", "final validation loss", "best validation loss",
              f"validation vs {baseline.name}", "avg words"]
    header += [f"{metric} ({definition})" for definition in DEFINITIONS for metric in ("rep-2 %", "log-diversity")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for summary in summaries:
        versus = "-" if summary is baseline else difference_verdict(summary.final_validation, baseline.final_validation)
        cells = [summary.name, str(summary.seeds), summary.train_loss, summary.final_validation, summary.best_validation,
                 versus, summary.avg_words]
        cells += [value for d in DEFINITIONS for value in (summary.rep_2[d], summary.log_diversity[d])]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _mean_curve(curves: List[Dict[int, float]]):
    """Iterations every seed logged, with the mean, min and max there."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    values = [[c[step] for c in curves] for step in steps]
    return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_runs(runs: List[Run], output_dir: str, words: int) -> List[str]:
    """Loss curves (mean over seeds, band from min to max), response lengths and the
    Table 4 metrics (mean, error bar one standard deviation) as PNGs."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(runs)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, group in groups.items():
        for axis, curves, marker in ((train_axis, [r.train for r in group], "."),
                                     (valid_axis, [r.validation for r in group if r.validation], "o")):
            steps, mean, low, high = _mean_curve(curves)
            if not steps:
                continue
            line, = axis.plot(steps, mean, marker=marker, label=name)
            if len(curves) > 1:
                axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15)
    for axis, title in ((train_axis, "training loss (with noise)"), (valid_axis, "validation loss (no noise)")):
        axis.set_title(title)
        axis.set_xlabel("iteration")
        if axis.lines:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no validation loss in the logs", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    written.append(os.path.join(output_dir, "loss.png"))
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    with_outputs = {name: [r for r in group if r.outputs] for name, group in groups.items()}
    with_outputs = {name: group for name, group in with_outputs.items() if group}
    if with_outputs:
        figure, (length_axis, rep_axis, diversity_axis) = plt.subplots(1, 3, figsize=(15, 4))
        length_axis.hist([[len(t.split()) for r in group for t in r.outputs] for group in with_outputs.values()],
                         bins=20, label=list(with_outputs))
        length_axis.set_title("response length (words, all seeds)")
        length_axis.legend(fontsize=8)
        summaries = [summarize(group, words) for group in with_outputs.values()]
        positions = list(range(len(summaries)))
        for axis, field_name, title in ((rep_axis, "rep_2", f"rep-2 (%) of the first {words} words (paper)"),
                                        (diversity_axis, "log_diversity", "log-diversity (paper)")):
            spreads = [getattr(s, field_name)["paper"] for s in summaries]
            axis.bar(positions, [sp.mean if sp else 0 for sp in spreads],
                     yerr=[sp.sd if sp else 0 for sp in spreads], capsize=3)
            axis.set_xticks(positions, [s.name for s in summaries], rotation=30, ha="right", fontsize=8)
            axis.set_title(title)
        figure.tight_layout()
        written.append(os.path.join(output_dir, "responses.png"))
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written
