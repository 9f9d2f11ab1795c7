"""Convert checkpoints between Hugging Face (LLaMA-1/2/3, OPT) and megatron-core.

  symnoise-convert hf-to-megatron --load-dir HF_DIR --save-dir MEGATRON_DIR
  symnoise-convert megatron-to-hf --load-dir MEGATRON_DIR --save-dir HF_DIR

hf-to-megatron writes a megatron-core distributed (torch_dist) checkpoint in Megatron-LM's
layout (MEGATRON_DIR/release, latest_checkpointed_iteration.txt) that loads under any
TP/PP. Run it under torchrun to spread the layers, and the memory, over several processes:
  torchrun --nproc-per-node 4 $(which symnoise-convert) hf-to-megatron ...

megatron-to-hf streams: a process holds one layer's tensor at a time (plus the embedding or
output layer, read whole), so its memory does not grow with the model. Under torchrun the
ranks share the layers and write the same files together (a 70B export on one node):
  torchrun --nproc-per-node 8 $(which symnoise-convert) megatron-to-hf ...
The export carries the training data's prompt template (recorded in a fine-tune's
checkpoints) as the tokenizer's chat template, and NEFTune's decoding (greedy, repetition
penalty 1.2, the template's stop tokens) as generation_config.json; the base model's is kept
as generation_config.base.json.

--save-dir must be a new or empty folder: old files beside new ones would be loaded instead
of them (a stale model.safetensors beside new shards) or move a run's latest checkpoint.
--overwrite replaces everything in it; a folder with a training run's checkpoints (iter_*)
is refused even then.
"""

import argparse
import sys

import torch
import torch.distributed as dist

from symnoise_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
from symnoise_megatron.checkpoint.serving_files import template_to_export
from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.data.templates import TEMPLATES
from symnoise_megatron.runtime.cpu import runtime_for_this_machine

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="direction", required=True)
    to_megatron = sub.add_parser("hf-to-megatron", help="Hugging Face directory -> megatron-core checkpoint")
    to_megatron.add_argument("--load-dir", required=True, help="HF directory: config.json, *.safetensors, tokenizer files")
    to_megatron.add_argument("--save-dir", required=True, help="megatron checkpoint directory to write")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                             help="pad the vocabulary to a multiple of this (x TP at load time) (default: 128)")
    to_megatron.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the HF dtype)")
    to_hf = sub.add_parser("megatron-to-hf", help="megatron-core checkpoint (its latest iteration) -> Hugging Face")
    to_hf.add_argument("--load-dir", required=True, help="megatron checkpoint directory (with latest_checkpointed_iteration.txt)")
    to_hf.add_argument("--save-dir", required=True, help="HF directory to write")
    to_hf.add_argument("--max-shard-size-gb", type=float, default=5.0, help="largest safetensors file (default: 5)")
    to_hf.add_argument("--prompt-template", choices=list(TEMPLATES),
                       help="the chat template and stop tokens to export (default: the template the checkpoint was "
                            "fine-tuned with; a checkpoint that records none keeps the base model's files)")
    to_megatron.add_argument("--overwrite", action="store_true",
                             help="replace what --save-dir holds (an earlier conversion included; never iter_* checkpoints)")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="replace everything in --save-dir (the new folder is written beside it and moved into place)")
    for command in (to_megatron, to_hf):
        command.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    with runtime_for_this_machine():
        if args.direction == "hf-to-megatron":
            model = hf_to_megatron(args.load_dir, args.save_dir, args.make_vocab_size_divisible_by,
                                   DTYPES.get(args.dtype), progress=not args.no_progress, overwrite=args.overwrite)
        else:
            model = megatron_to_hf(args.load_dir, args.save_dir, int(args.max_shard_size_gb * 2**30),
                                   progress=not args.no_progress, overwrite=args.overwrite,
                                   prompt_template=args.prompt_template)
        if dist.get_rank() != 0:  # torchrun: one report
            return 0
    if args.direction == "megatron-to-hf":
        _, note = template_to_export(args.load_dir, args.prompt_template)
        if note:
            print(f"note: {note}", file=sys.stderr)
    print(f"converted {model.architecture} ({model.num_layers} layers, hidden {model.hidden_size}) to {args.save_dir}")
    return 0
