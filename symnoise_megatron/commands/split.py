"""Set aside a held-out part of an instruction file (JSON array or JSONL): a seeded shuffle.

  symnoise-split --input alpaca_eval.json --held-out 100 --seed 0 \\
      --train-output data/train.json --held-out-output data/held_out.json

Both outputs are JSON arrays in the input's order; the same --seed gives the same split.
Missing folders of the outputs are created. Nothing is written unless the whole split
succeeds, and an output may not be the input or the other output.
Preprocess them separately and pass the held-out prefix as --valid-data-path; generate
answers for the held-out prompts with symnoise-generate --prompts.
"""

import argparse
import os
from typing import List, Tuple

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.records import read_records, records_text, split_records


def refuse_clashing_paths(named_paths: List[Tuple[str, str]]) -> None:
    """Two flags naming one file (through a link too): writing one would destroy the other."""
    for flag, path in named_paths[1:]:  # the outputs (the first is the input)
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder; give the file to write")
    for position, (first_flag, first_path) in enumerate(named_paths):
        for second_flag, second_path in named_paths[position + 1:]:
            if os.path.realpath(first_path) == os.path.realpath(second_path):
                raise ValueError(f"{second_flag} {second_path} is the same file as {first_flag} {first_path}; "
                                 "give each output its own path, other than the input")


def write_outputs(outputs: List[Tuple[str, str, List[dict]]]) -> None:
    """Each (flag, path, rows) staged in a temporary file, then all renamed into place: a failure
    leaves every output as it was (no file half-written, no train file without its held-out file)."""
    staged = []
    try:
        for flag, path, rows in outputs:
            folder = os.path.dirname(os.path.abspath(path))
            temporary = f"{path}.tmp-{os.getpid()}"
            try:
                os.makedirs(folder, exist_ok=True)
                with open(temporary, "w", encoding="utf-8") as handle:
                    staged.append(temporary)
                    handle.write(records_text(rows))
            except OSError as error:
                raise ValueError(f"{flag} {path}: cannot write ({error.strerror})") from None
        for (flag, path, _), temporary in zip(outputs, staged):
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise ValueError(f"{flag} {path}: cannot write ({error.strerror})") from None
    finally:
        for temporary in staged:
            if os.path.exists(temporary):
                os.remove(temporary)


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
    refuse_clashing_paths([("--input", args.input), ("--train-output", args.train_output),
                           ("--held-out-output", args.held_out_output)])
    train, held_out = split_records(read_records(args.input, args.field), args.held_out, args.seed)
    write_outputs([("--train-output", args.train_output, train), ("--held-out-output", args.held_out_output, held_out)])
    print(f"{args.input}: {len(train)} rows to {args.train_output}, {len(held_out)} to {args.held_out_output}")
    return 0
