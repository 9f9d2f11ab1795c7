"""Put fine-tuning runs side by side: Markdown tables and PNG plots, the paper's among them.

  symnoise-compare --run none=runs/none/train.log:outputs/none.json \\
      --run symnoise5=runs/sym/train.log:outputs/sym.json --output-dir results/ --dataset alpaca
  # the paper's layout from run folders (Tables 1-4, Figure 1)
  symnoise-compare --run-dir runs/alpaca_none --run-dir runs/alpaca_neftune5 \\
      --run-dir runs/alpaca_symnoise5 --output-dir results/

Each --run is NAME=TRAINING_LOG[:OUTPUTS_JSON]; the log is the fine-tune's console output
(Megatron-LM's line format), the outputs AlpacaEval's model-outputs JSON of that run.
Writes loss.png (training and validation loss), responses.png (length distribution,
rep-2, log-diversity) and table.md. The table gives rep-2 and log-diversity of the first K
words under both definitions of symnoise-metrics: "paper" (the published tables' code,
bugs included, comparable with NEFTune's and SymNoise's Table 4) and "standard" (corrected);
the plots show the paper's.

Each --run-dir is a run folder: run.json (labels: data set, model, noise kind and alpha, seed),
the run's symnoise-evaluate results (alpacaeval, leaderboard), optionally outputs.json and
train.log. They give paper.md: Tables 1-2 (AlpacaEval win rate per data set and model for
none / NEFTune / SymNoise, and the gain over none; one table per judge), Table 3 (every noise
kind and alpha with win rate and average characters), Table 4 (text statistics of the
answers) and Figure 1's numbers, with figure1.png (the leaderboard tasks per setting). Folders
with the same labels are seeds. Folders with a train.log join the loss table and plots too.

Each run with a training log is labelled from its provenance (the record of the last
checkpoint its log says it saved, or of the model its outputs name), in a second table; runs
of different models or training data are refused in one table unless --allow-mixed (run
folders are compared within each data set and model their labels name).
"""

import argparse
import os

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.common.files import write_text_atomically
from symnoise_megatron.evaluation.metrics import DEFINITIONS, WORDS_PER_DATASET, check_words, read_outputs
from symnoise_megatron.evaluation.paper import paper_layout, plot_leaderboard
from symnoise_megatron.evaluation.run_folders import read_run_folder
from symnoise_megatron.evaluation.run_provenance import check_comparable, provenance_table, run_record
from symnoise_megatron.evaluation.runs import plot_runs, read_log, summary_table


def read_runs(specs):
    """--run NAME=LOG[:OUTPUTS] arguments as (run, its provenance origin)."""
    runs = []
    for spec in specs:
        name, _, paths = spec.partition("=")
        log, _, outputs = paths.partition(":")
        if not name or not log:
            raise ValueError(f"--run {spec!r} is not NAME=LOG[:OUTPUTS]")
        run = read_log(log, name)
        run.outputs = read_outputs(outputs) if outputs else None
        runs.append((run, (name, *run_record(log, outputs or None))))
    return runs


def folder_runs(folders):
    """The run folders that have a training log, as (folder, run, its provenance origin), each run
    named by its setting (and data set and model, when the folders hold several)."""
    several = len({(f.dataset, f.model) for f in folders}) > 1
    runs = []
    for folder in folders:
        if folder.log:
            name = f"{folder.dataset}/{folder.model}/{folder.setting}" if several else folder.setting
            run = read_log(folder.log, name)
            run.outputs = folder.outputs
            runs.append((folder, run, (name, *run_record(folder.log))))
    return runs


def check_runs_comparable(listed, from_folders, allow_mixed: bool) -> None:
    """The --run runs are one comparison; run folders one per data set and model (their labels)."""
    groups = [[origin for _, origin in listed]]
    for key in sorted({(folder.dataset, folder.model) for folder, _, _ in from_folders}):
        groups.append([origin for folder, _, origin in from_folders if (folder.dataset, folder.model) == key])
    for group in groups:
        for note in check_comparable([(name, record) for name, record, _ in group], allow_mixed):
            print(note)


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=LOG[:OUTPUTS]",
                        help="a training log and (optionally) its answers; repeat per run")
    parser.add_argument("--run-dir", action="append", default=[], metavar="FOLDER",
                        help="a run folder (run.json and symnoise-evaluate results) for the paper's tables; repeat")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dataset", choices=list(WORDS_PER_DATASET), default="alpaca")
    parser.add_argument("--words", type=int, help="K words per response prefix (default: per --dataset)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="put runs of different models or training data in one table (default: refuse, naming them)")
    args = parser.parse_args(argv)
    if not args.run and not args.run_dir:
        parser.error("give at least one --run or --run-dir")
    words = args.words if args.words is not None else WORDS_PER_DATASET[args.dataset]
    for definition in DEFINITIONS:
        check_words(words, definition)
    folders = [read_run_folder(path) for path in args.run_dir]
    listed, from_folders = read_runs(args.run), folder_runs(folders)
    check_runs_comparable(listed, from_folders, args.allow_mixed)
    runs = [run for run, _ in listed] + [run for _, run, _ in from_folders]
    origins = [origin for _, origin in listed] + [origin for _, _, origin in from_folders]
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    if runs:
        table = summary_table(runs, words) + "\n\n" + provenance_table(origins)
        written.append(os.path.join(args.output_dir, "table.md"))
        write_text_atomically(written[-1], table + "\n")
        written += plot_runs(runs, args.output_dir, words)
        print(table)
    if folders:
        layout = paper_layout(folders, words)
        written.append(os.path.join(args.output_dir, "paper.md"))
        write_text_atomically(written[-1], layout)
        written += [path for path in [plot_leaderboard(folders, os.path.join(args.output_dir, "figure1.png"))] if path]
        print(layout)
    print("wrote " + ", ".join(written))
    return 0
