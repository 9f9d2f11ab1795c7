"""Tokenize instruction data into megatron-core indexed datasets (tokens + loss mask).

Example:
  symnoise-preprocess --input alpaca_data.json --output-prefix data/alpaca \\
      --tokenizer-model tokenizer.model --workers 8
"""

import argparse
import json

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.data.formats import format_names
from symnoise_megatron.data.preprocess import BOUNDARY_RULES, ON_ERROR, TURNS, PreprocessConfig, output_paths, preprocess
from symnoise_megatron.data.templates import TEMPLATES
from symnoise_megatron.data.tokenizer import TokenizerSpec


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("input")
    data.add_argument("--input", nargs="+", required=True, metavar="PATH",
                      help="files or globs (.json array, .jsonl, .parquet) or saved `datasets` directories")
    data.add_argument("--format", default="auto", choices=["auto", *format_names()],
                      help="row layout; auto detects it from each file's columns (default: auto)")
    data.add_argument("--prompt-key", help="generic layout: the column holding the prompt")
    data.add_argument("--response-key", help="generic layout: the column holding the response")
    data.add_argument("--split", help="split of a `datasets` directory (default: train)")
    data.add_argument("--turns", choices=TURNS, default="first",
                      help="conversations: keep the first exchange (the paper) or all (default: first)")
    tok = parser.add_argument_group("tokenizer (offline)")
    tok.add_argument("--tokenizer-model", help="a SentencePiece .model file")
    tok.add_argument("--tokenizer-dir", help="a Hugging Face tokenizer directory (tokenizer.json or tokenizer.model)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-prefix", required=True,
                     help="writes PREFIX_tokens.bin/.idx, PREFIX_loss_mask.bin/.idx and PREFIX_meta.json")
    out.add_argument("--prompt-template", choices=list(TEMPLATES),
                     help="default: vicuna_v1.1 for ShareGPT, alpaca otherwise")
    out.add_argument("--seq-length", type=int, default=512,
                     help="longest sample in tokens, BOS/EOS included; longer ones are cut at the end (default: 512)")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1,
                     help="tokenizing processes; 1 tokenizes in this process, N > 1 starts N (default: 1)")
    run.add_argument("--on-error", choices=ON_ERROR, default="fail",
                     help="bad rows: stop at the first, or skip and count them in the meta file (default: fail)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--boundary-rule", choices=BOUNDARY_RULES, default="spans",
                     help="where a response starts: 'spans' encodes each sample once and reads the boundary off the "
                          "pieces' spans (the two-pass rule where a piece crosses it); 'two-pass' also encodes the "
                          "prompt alone (Stanford Alpaca's rule; the same files, twice the tokenizer work) (default: spans)")
    return parser.parse_args(argv)


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    config = PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix,
        tokenizer=TokenizerSpec(model_file=args.tokenizer_model, directory=args.tokenizer_dir),
        format=args.format, prompt_template=args.prompt_template, prompt_key=args.prompt_key,
        response_key=args.response_key, turns=args.turns, seq_length=args.seq_length,
        workers=args.workers, on_error=args.on_error, split=args.split, progress=not args.no_progress,
        boundary_rule=args.boundary_rule,
    )
    meta = preprocess(config)
    summary = {k: meta[k] for k in ("samples", "tokens", "response_tokens", "truncated", "dropped", "skipped_rows")}
    print(json.dumps(summary))
    print(f"{meta['samples_per_second']:.0f} samples/s, {meta['tokens_per_second']:.0f} tokens/s "
          f"with {meta['workers']} worker(s); wrote {output_paths(args.output_prefix)['meta']}")
    return 0
