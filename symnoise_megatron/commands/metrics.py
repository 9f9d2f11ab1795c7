"""Table 4 statistics of generated answers: length, rep-2/3/4, diversity, log-diversity.

  symnoise-metrics outputs/none.json outputs/symnoise.json --dataset alpaca
  symnoise-metrics outputs/none.json --definition standard --format json

Each file is AlpacaEval's model-outputs JSON (a list of objects with ``output``) or JSONL.

--definition paper (default) reproduces the lm-watermarking repetition_diversity.py code that
produced NEFTune's Table 4 (reused by SymNoise), bugs included, so the figures compare with
the published ones:
  * off by one: a K-word prefix gives K - n n-grams (its last n-gram is never counted);
  * double division: per response, diversity = prod over n = 2, 3, 4 of (1 - rep_n / 100)
    with rep_n already a fraction, so diversity is close to 1 for any text;
  * log-diversity = -ln(max(1 - diversity, e^-20)) per response, then averaged: a response
    without any repeated n-gram scores exactly 20.
--definition standard counts all K - n + 1 n-grams, takes diversity = prod (1 - rep_n), and
log-diversity per response capped at --log-diversity-cap (default 20), averaged.
Under both: responses shorter than K words are left out of repetition and diversity (not of
the lengths); rep_2 is in percent, rep_3 and rep_4 are fractions; diversity and
log_diversity are means of per-response values. Details: symnoise_megatron/evaluation/metrics.py.
"""

import argparse
import json

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.metrics import (DEFINITIONS, PAPER_LOG_DIVERSITY_CAP, WORDS_PER_DATASET, check_words,
                                                  read_outputs, response_metrics, to_csv, to_markdown)


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+")
    parser.add_argument("--dataset", choices=list(WORDS_PER_DATASET), default="alpaca",
                        help="sets K, the words per response prefix (default alpaca): " + ", ".join(f"{k} {v}" for k, v in WORDS_PER_DATASET.items()))
    parser.add_argument("--words", type=int, help="K, overriding --dataset")
    parser.add_argument("--definition", choices=DEFINITIONS, default="paper",
                        help="paper: the published tables' code, bugs included (default); standard: corrected")
    parser.add_argument("--log-diversity-cap", type=float,
                        help=f"with --definition standard: the per-response log-diversity cap (default {PAPER_LOG_DIVERSITY_CAP:g}; "
                             "'inf' for none); the paper's is fixed at 20")
    parser.add_argument("--format", choices=["markdown", "csv", "json"], default="markdown", help="default markdown")
    args = parser.parse_args(argv)
    words = args.words if args.words is not None else WORDS_PER_DATASET[args.dataset]
    check_words(words, args.definition)
    if args.log_diversity_cap is not None and args.definition == "paper":
        raise ValueError("--log-diversity-cap applies to --definition standard; the paper's cap is fixed at 20")
    cap = PAPER_LOG_DIVERSITY_CAP if args.log_diversity_cap is None else args.log_diversity_cap
    # Every file is read and measured before anything is printed: a bad one prints nothing.
    rows = [response_metrics(read_outputs(path), words, path, args.definition, cap) for path in args.outputs]
    if args.format == "json":
        print(json.dumps([row.to_dict() for row in rows], indent=2))
    else:
        print(to_markdown(rows) if args.format == "markdown" else to_csv(rows), end="\n" if args.format == "markdown" else "")
    return 0
