"""symnoise-inspect: what a path holds, in a short block (or JSON for scripts).

  symnoise-inspect runs/alpaca                  # a training run: model, data, noise, layout, versions, history
  symnoise-inspect runs/alpaca/iter_0000200     # one of its checkpoints
  symnoise-inspect data/alpaca_llama2           # a preprocessed prefix: samples, template, tokenizer, digest
  symnoise-inspect hf/alpaca-symnoise           # a Hugging Face directory exported by symnoise-convert
  symnoise-inspect outputs/symnoise.json        # generated answers: the generator and its model's provenance
  symnoise-inspect --json runs/alpaca           # the same as JSON

Also a converted checkpoint (symnoise-convert hf-to-megatron). A path that is none of these, or a
truncated or foreign file among them, is one line on stderr and exit code 2.

The module is not called ``inspect``: ``python tools/inspect.py`` would put tools/ first on
sys.path, and that file would then stand in for the standard library's ``inspect`` module,
which torch and dataclasses import.
"""

import argparse
import json

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.inspection import inspect_path, render


@exits_on_user_error
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a checkpoint folder or iter_* folder, a preprocessed prefix (or one of its files), "
                                     "an exported Hugging Face directory, or a generated outputs file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON (default: a short text block)")
    args = parser.parse_args(argv)
    report = inspect_path(args.path)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
