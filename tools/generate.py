#!/usr/bin/env python
"""Answer instructions with a Hugging Face checkpoint, prompted with the training template.

  python tools/generate.py --hf-dir out-hf --instruction "What is the capital of France?"
"""

import argparse
import sys

from symnoise_megatron.data.templates import TEMPLATES
from symnoise_megatron.evaluation.generate import Generator


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="a Hugging Face checkpoint directory with its tokenizer")
    parser.add_argument("--instruction", action="append", required=True, help="repeat for several")
    parser.add_argument("--prompt-template", choices=list(TEMPLATES), default="alpaca")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = Generator(args.hf_dir, args.prompt_template, args.seed)
    for instruction, answer in zip(args.instruction, generator.answer(args.instruction, args.max_new_tokens, args.temperature)):
        print(f"### Instruction: {instruction}\n### Response: {answer}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
