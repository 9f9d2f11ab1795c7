#!/usr/bin/env python
"""Answer instructions with a checkpoint, prompted with the training template.

  python tools/generate.py --hf-dir out-hf --instruction "What is the capital of France?"
  python tools/generate.py --megatron-dir runs/x --prompts alpaca_eval.json --output outputs/x.json

--prompts writes AlpacaEval's model-outputs JSON (instruction, output, generator, dataset),
ready for ``alpaca_eval --model_outputs``, and resumes a partial output file. A megatron
checkpoint is converted to Hugging Face format on the fly (its latest iteration).
Generation runs through transformers in eval mode: no noise is ever applied.
"""

import argparse
import os
import sys
import tempfile

from symnoise_megatron.cli import exits_on_user_error
from symnoise_megatron.data.templates import TEMPLATES
from symnoise_megatron.evaluation.generate import Generator, generate_file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-dir", help="a Hugging Face checkpoint directory with its tokenizer")
    model.add_argument("--megatron-dir", help="a megatron checkpoint directory (converted on the fly)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--instruction", action="append", help="answer this (repeat for several)")
    prompts.add_argument("--prompts", help="AlpacaEval prompt file (JSON list with 'instruction') or JSONL")
    parser.add_argument("--output", help="with --prompts: the model-outputs JSON to write or resume")
    parser.add_argument("--generator-name", help="the 'generator' field (default: the checkpoint's name)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--prompt-template", choices=list(TEMPLATES), default="alpaca")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.prompts and not args.output:
        parser.error("--prompts needs --output")
    return args


def run(args, hf_dir):
    generator = Generator(hf_dir, args.prompt_template, args.seed)
    if args.instruction:
        answers = generator.answer(args.instruction, args.max_new_tokens, args.temperature)
        for instruction, answer in zip(args.instruction, answers):
            print(f"### Instruction: {instruction}\n### Response: {answer}\n")
        return
    name = args.generator_name or os.path.basename(os.path.normpath(args.megatron_dir or args.hf_dir))
    rows = generate_file(generator, args.prompts, args.output, name, args.max_new_tokens, args.temperature,
                         args.limit, progress=not args.no_progress)
    print(f"wrote {len(rows)} answers to {args.output}")


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.hf_dir:
        run(args, args.hf_dir)
        return 0
    from symnoise_megatron.checkpoint.convert import megatron_to_hf
    from symnoise_megatron.runtime.cpu import runtime_for_this_machine

    with tempfile.TemporaryDirectory() as hf_dir:
        with runtime_for_this_machine():
            megatron_to_hf(args.megatron_dir, hf_dir, progress=False)
        run(args, hf_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
