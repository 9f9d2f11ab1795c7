"""Read training logs (Megatron-LM's line format) and put several runs side by side."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from symnoise_megatron.evaluation.metrics import response_metrics

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


def summary_table(runs: List[Run], words: int) -> str:
    header = ["run", "final train loss", "final validation loss", "best validation loss",
              "responses", "avg words", "rep-2 (%)", "log-diversity"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        last_valid = run.validation[max(run.validation)] if run.validation else None
        best_valid = min(run.validation.values()) if run.validation else None
        metrics = response_metrics(run.outputs, words, run.name) if run.outputs else None
        cells = [run.name, run.train[max(run.train)], last_valid, best_valid,
                 metrics.responses if metrics else None, metrics.avg_words if metrics else None,
                 metrics.rep_2 if metrics else None, metrics.log_diversity if metrics else None]
        lines.append("| " + " | ".join("-" if c is None else f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot_runs(runs: List[Run], output_dir: str, words: int) -> List[str]:
    """Loss curves, response-length distributions and the Table 4 metrics as PNGs."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(output_dir, exist_ok=True)
    written = []
    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        train_axis.plot(list(run.train), list(run.train.values()), marker=".", label=run.name)
        if run.validation:
            valid_axis.plot(list(run.validation), list(run.validation.values()), marker="o", label=run.name)
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

    with_outputs = [run for run in runs if run.outputs]
    if with_outputs:
        figure, (length_axis, metric_axis) = plt.subplots(1, 2, figsize=(11, 4))
        length_axis.hist([[len(t.split()) for t in run.outputs] for run in with_outputs], bins=20,
                         label=[run.name for run in with_outputs])
        length_axis.set_title("response length (words)")
        length_axis.legend(fontsize=8)
        metrics = [response_metrics(run.outputs, words, run.name) for run in with_outputs]
        names = [m.file for m in metrics]
        positions = range(len(names))
        metric_axis.bar([p - 0.2 for p in positions], [m.rep_2 or 0 for m in metrics], width=0.4, label="rep-2 (%)")
        metric_axis.bar([p + 0.2 for p in positions], [m.log_diversity or 0 for m in metrics], width=0.4, label="log-diversity")
        metric_axis.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
        metric_axis.set_title(f"repetition and diversity (first {words} words)")
        metric_axis.legend(fontsize=8)
        figure.tight_layout()
        written.append(os.path.join(output_dir, "responses.png"))
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written
