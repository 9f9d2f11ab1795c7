"""Set aside a held-out part of an instruction file (JSON array or JSONL): a seeded shuffle.

  symnoise-split --input alpaca_eval.json --held-out 100 --seed 0 \\
      --train-output data/train.json --held-out-output data/held_out.json

Both outputs are JSON arrays in the input's order; the same --seed gives the same split.
Preprocess them separately and pass the held-out prefix as --valid-data-path; generate
answers for the held-out prompts with symnoise-generate --prompts.
"""

import argparse

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.records import read_records, split_records, write_records


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--held-out", type=int, required=True, help="rows to set aside")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--field", default="instruction", help="a string field every row must have (default: instruction)")
    parser.add_argument("--train-output", required=True)
    parser.add_argument("--held-out-output", required=True)
    args = parser.parse_args(argv)
    train, held_out = split_records(read_records(args.input, args.field), args.held_out, args.seed)
    write_records(train, args.train_output)
    write_records(held_out, args.held_out_output)
    print(f"{args.input}: {len(train)} rows to {args.train_output}, {len(held_out)} to {args.held_out_output}")
    return 0
