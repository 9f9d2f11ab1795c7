#!/usr/bin/env python
"""Table 4 statistics of generated answers: length, rep-2/3/4, diversity, log-diversity.

  python tools/text_metrics.py outputs/none.json outputs/symnoise.json --dataset alpaca

Each file is AlpacaEval's model-outputs JSON (a list of objects with ``output``) or JSONL.
The definitions are in symnoise_megatron/evaluation/metrics.py.
"""

import argparse
import json
import sys

from symnoise_megatron.cli import exits_on_user_error
from symnoise_megatron.evaluation.metrics import WORDS_PER_DATASET, read_outputs, response_metrics, to_csv, to_markdown


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+")
    parser.add_argument("--dataset", choices=list(WORDS_PER_DATASET), default="alpaca",
                        help="sets K, the words per response prefix: " + ", ".join(f"{k} {v}" for k, v in WORDS_PER_DATASET.items()))
    parser.add_argument("--words", type=int, help="K, overriding --dataset")
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown")
    args = parser.parse_args(argv)
    words = args.words or WORDS_PER_DATASET[args.dataset]
    rows = [response_metrics(read_outputs(path), words, path) for path in args.outputs]
    if args.format == "json":
        print(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        print(to_markdown(rows) if args.format == "markdown" else to_csv(rows), end="\n" if args.format == "markdown" else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
