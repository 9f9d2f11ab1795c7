"""The paper's tables and Figure 1 from run folders (``evaluation/run_folders.py``).

- Tables 1 and 2: AlpacaEval win rate (%) per data set and model, none / NEFTune / SymNoise,
  with each noisy setting's gain over none; one table per annotator found (the paper's
  Table 1 was judged by GPT-4, Table 2 by ChatGPT).
- Table 3: every noise kind and alpha, with its win rate per annotator and the average answer
  length in characters.
- Table 4: the answers' text statistics (``evaluation/metrics.py``, the paper's definition).
- Figure 1: the leaderboard tasks per setting, as a table and a grouped bar chart.

Folders with the same labels are seeds: a cell is their mean, ``± sd`` over seeds when there
are several. Nothing is left out silently: a setting without a result shows ``-``.
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from symnoise_megatron.evaluation.metrics import response_metrics
from symnoise_megatron.evaluation.run_folders import RunFolder
from symnoise_megatron.evaluation.runs import Spread

# Tables 1-2 compare the paper's three settings.
MAIN_KINDS = ("none", "uniform", "symmetric")


def _table(header: List[str], rows: List[List[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _groups(folders: Sequence[RunFolder]) -> Dict[Tuple[str, str], Dict[str, List[RunFolder]]]:
    """(dataset, model) -> setting -> its seeds, settings sorted (none first, kinds, alphas)."""
    groups: Dict[Tuple[str, str], Dict[str, List[RunFolder]]] = {}
    for folder in sorted(folders, key=lambda f: f.order):
        groups.setdefault((folder.dataset, folder.model), {}).setdefault(folder.setting, []).append(folder)
    return groups


def _spread(values) -> Optional[Spread]:
    return Spread.of(list(values))


def _show(spread: Optional[Spread], digits: int = 2) -> Optional[str]:
    if spread is None:
        return None
    return f"{spread.mean:.{digits}f}" if spread.n == 1 else f"{spread.mean:.{digits}f} ± {spread.sd:.{digits}f}"


def annotators(folders: Sequence[RunFolder]) -> List[str]:
    """Every judge found, in name order (alpaca_eval_gpt4, Table 1's, before chatgpt, Table 2's)."""
    return sorted({annotator for folder in folders for annotator in folder.alpacaeval})


def win_rate(seeds: List[RunFolder], annotator: str) -> Optional[Spread]:
    return _spread(f.alpacaeval[annotator]["win_rate"] for f in seeds
                   if annotator in f.alpacaeval and f.alpacaeval[annotator]["win_rate"] is not None)


def win_rate_table(folders: Sequence[RunFolder], annotator: str) -> str:
    """Tables 1/2: a row per (data set, model), a column per none / NEFTune / SymNoise setting
    present, then each noisy setting's gain over none (difference of the means)."""
    groups = _groups([f for f in folders if f.kind in MAIN_KINDS or not f.noisy])
    settings: List[str] = []
    for by_setting in groups.values():
        settings += [s for s in by_setting if s not in settings]
    settings.sort(key=lambda s: next(f.order for g in groups.values() for f in g.get(s, [])))
    noisy = [s for s in settings if s != "none"]
    rows = []
    for (dataset, model), by_setting in groups.items():
        rates = {s: win_rate(by_setting[s], annotator) if s in by_setting else None for s in settings}
        base = rates.get("none")
        gains = [f"{rates[s].mean - base.mean:+.2f}" if rates[s] is not None and base is not None else None
                 for s in noisy]
        rows.append([dataset, model] + [_show(rates[s]) for s in settings] + gains)
    return _table(["data set", "model"] + settings + [f"{s} − none" for s in noisy], rows)


def average_characters(seeds: List[RunFolder]) -> Optional[Spread]:
    """Mean characters per answer: of outputs.json where the folder has it, else alpaca-eval's."""
    values = []
    for folder in seeds:
        if folder.outputs:
            values.append(statistics.fmean(len(text) for text in folder.outputs))
        elif folder.alpacaeval:
            values.append(next(iter(folder.alpacaeval.values()))["avg_length"])
    return _spread(values)


def ablation_table(folders: Sequence[RunFolder]) -> str:
    """Table 3: every noise kind and alpha, win rate per annotator, average characters."""
    judges = annotators(folders)
    rows = []
    for (dataset, model), by_setting in _groups(folders).items():
        for setting, seeds in by_setting.items():
            rows.append([dataset, model, setting, len(seeds)] + [_show(win_rate(seeds, a)) for a in judges]
                        + [_show(average_characters(seeds), 1)])
    return _table(["data set", "model", "setting", "seeds"] + [f"win rate ({a})" for a in judges]
                  + ["avg characters"], rows)


def text_statistics_table(folders: Sequence[RunFolder], words: int) -> str:
    """Table 4 from each setting's answers (the paper's definition, first ``words`` words)."""
    rows = []
    for (dataset, model), by_setting in _groups(folders).items():
        for setting, seeds in by_setting.items():
            measured = [response_metrics(f.outputs, words, f.path) for f in seeds if f.outputs]
            if not measured:
                continue
            rows.append([dataset, model, setting, len(measured)]
                        + [_show(_spread(getattr(m, key) for m in measured if getattr(m, key) is not None), digits)
                           for key, digits in (("avg_chars", 1), ("avg_words", 1), ("rep_2", 2),
                                               ("log_diversity", 2))])
    return _table(["data set", "model", "setting", "seeds", "avg characters", "avg words", "rep-2 %",
                   "log-diversity"], rows)


def leaderboard_tasks(folders: Sequence[RunFolder]) -> List[str]:
    tasks: List[str] = []
    for folder in folders:
        if folder.leaderboard:
            tasks += [t for t in folder.leaderboard["tasks"] if t not in tasks]
    return tasks


def task_score(seeds: List[RunFolder], task: str) -> Tuple[Optional[Spread], Optional[float]]:
    """(the task's metric x 100 over seeds, mean lm-eval standard error x 100)."""
    rows = [f.leaderboard["tasks"][task] for f in seeds if f.leaderboard and task in f.leaderboard["tasks"]]
    rows = [r for r in rows if r["value"] is not None]
    errors = [r["stderr"] for r in rows if r["stderr"] is not None]
    return _spread(100 * r["value"] for r in rows), (100 * statistics.fmean(errors) if errors else None)


def leaderboard_table(folders: Sequence[RunFolder]) -> str:
    """Figure 1's numbers: each task's metric (x 100) per setting, and their average."""
    tasks = leaderboard_tasks(folders)
    metric = {}
    for folder in folders:
        for task, row in (folder.leaderboard or {}).get("tasks", {}).items():
            metric.setdefault(task, f"{row['metric']}, {row['num_fewshot']}-shot")
    rows = []
    for (dataset, model), by_setting in _groups([f for f in folders if f.leaderboard]).items():
        for setting, seeds in by_setting.items():
            scores = [task_score(seeds, task)[0] for task in tasks]
            average = statistics.fmean(s.mean for s in scores) if all(scores) else None
            rows.append([dataset, model, setting, len(seeds)] + [_show(s) for s in scores]
                        + [None if average is None else f"{average:.2f}"])
    return _table(["data set", "model", "setting", "seeds"] + [f"{t} ({metric[t]})" for t in tasks] + ["average"],
                  rows)


def plot_leaderboard(folders: Sequence[RunFolder], path: str) -> Optional[str]:
    """Figure 1: a grouped bar chart per (data set, model): tasks on x, a bar per setting, error
    bars lm-eval's standard error. None when no folder has leaderboard results."""
    with_results = [f for f in folders if f.leaderboard]
    if not with_results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(with_results)
    tasks = leaderboard_tasks(with_results)
    figure, axes = plt.subplots(1, len(groups), figsize=(max(6, 1.6 * len(tasks) + 3) * len(groups), 4.2),
                                squeeze=False)
    for axis, ((dataset, model), by_setting) in zip(axes[0], groups.items()):
        width = 0.8 / len(by_setting)
        for index, (setting, seeds) in enumerate(by_setting.items()):
            scores = [task_score(seeds, task) for task in tasks]
            positions = [t + (index - (len(by_setting) - 1) / 2) * width for t in range(len(tasks))]
            axis.bar(positions, [s.mean if s else 0 for s, _ in scores], width,
                     yerr=[e or 0 for _, e in scores], capsize=3, label=setting)
        axis.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("score (%); bars: lm-eval's standard error", fontsize=8)
        axis.set_title(f"{model}, fine-tuned on {dataset}", fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def paper_layout(folders: Sequence[RunFolder], words: int) -> str:
    """The Markdown of every table the folders have results for."""
    sections = []
    for annotator in annotators(folders):
        sections.append(f"## AlpacaEval win rate (%), judged by {annotator} (Tables 1-2)\n\n"
                        + win_rate_table(folders, annotator))
    if any(f.alpacaeval or f.outputs for f in folders):
        sections.append("## Noise kinds and alphas (Table 3)\n\n" + ablation_table(folders))
    if any(f.outputs for f in folders):
        sections.append(f"## Text statistics of the answers, first {words} words, the paper's definition "
                        f"(Table 4)\n\n" + text_statistics_table(folders, words))
    if any(f.leaderboard for f in folders):
        sections.append("## Leaderboard tasks, score x 100 (Figure 1)\n\n" + leaderboard_table(folders)
                        + "\n\n![leaderboard tasks](figure1.png)")
    sections.append("Cells: mean over seeds (± standard deviation when there are several); `-`: no result.")
    return "\n\n".join(sections) + "\n"
