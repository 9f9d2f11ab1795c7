"""Put fine-tuning runs side by side: a Markdown table and PNG plots.

  symnoise-compare --run none=runs/none/train.log:outputs/none.json \\
      --run symnoise5=runs/sym/train.log:outputs/sym.json --output-dir results/ --dataset alpaca

Each --run is NAME=TRAINING_LOG[:OUTPUTS_JSON]; the log is the fine-tune's console output
(Megatron-LM's line format), the outputs AlpacaEval's model-outputs JSON of that run.
Writes loss.png (training and validation loss), responses.png (length distribution,
rep-2, log-diversity) and table.md. The table gives rep-2 and log-diversity of the first K
words under both definitions of symnoise-metrics: "paper" (the published tables' code,
bugs included, comparable with NEFTune's and SymNoise's Table 4) and "standard" (corrected);
the plots show the paper's.

Each run is labelled from its provenance (the record of the last checkpoint its log says it
saved, or of the model its outputs name), in a second table; runs of different models or
training data are refused in one table unless --allow-mixed.
"""

import argparse
import os

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.metrics import DEFINITIONS, WORDS_PER_DATASET, check_words, read_outputs
from symnoise_megatron.evaluation.run_provenance import check_comparable, provenance_table, run_record
from symnoise_megatron.evaluation.runs import plot_runs, read_log, summary_table


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="NAME=LOG[:OUTPUTS]")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dataset", choices=list(WORDS_PER_DATASET), default="alpaca")
    parser.add_argument("--words", type=int, help="K words per response prefix (default: per --dataset)")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="put runs of different models or training data in one table (default: refuse, naming them)")
    args = parser.parse_args(argv)
    words = args.words if args.words is not None else WORDS_PER_DATASET[args.dataset]
    for definition in DEFINITIONS:
        check_words(words, definition)
    runs, origins = [], []
    for spec in args.run:
        name, _, paths = spec.partition("=")
        log, _, outputs = paths.partition(":")
        if not name or not log:
            raise ValueError(f"--run {spec!r} is not NAME=LOG[:OUTPUTS]")
        run = read_log(log, name)
        run.outputs = read_outputs(outputs) if outputs else None
        runs.append(run)
        origins.append((name, *run_record(log, outputs or None)))
    for note in check_comparable([(name, record) for name, record, _ in origins], args.allow_mixed):
        print(note)
    table = summary_table(runs, words) + "\n\n" + provenance_table(origins)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "table.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    written = plot_runs(runs, args.output_dir, words)
    print(table)
    print("wrote " + ", ".join(written + [os.path.join(args.output_dir, "table.md")]))
    return 0
