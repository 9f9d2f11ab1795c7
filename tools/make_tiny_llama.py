#!/usr/bin/env python
"""Write a tiny random LLaMA as a Hugging Face directory, with the bundled tokenizer.

The demo's stand-in for a pretrained checkpoint: the same files a LLaMA release has
(config.json, model.safetensors, tokenizer.model, tokenizer_config.json), small enough to
fine-tune on two CPU cores in a minute.
"""

import argparse
import json
import os
import shutil

import torch

from symnoise_megatron.data import BUNDLED_TOKENIZER


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save-dir", required=True)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    import sentencepiece

    vocab = sentencepiece.SentencePieceProcessor(model_file=BUNDLED_TOKENIZER).vocab_size()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=args.hidden_size, intermediate_size=args.hidden_size * 11 // 4, num_hidden_layers=args.num_layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(args.save_dir)
    shutil.copyfile(BUNDLED_TOKENIZER, os.path.join(args.save_dir, "tokenizer.model"))
    with open(os.path.join(args.save_dir, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, handle, indent=2)
    print(f"wrote a {sum(p.numel() for p in LlamaForCausalLM(config).parameters()) / 1e6:.1f}M-parameter LLaMA to {args.save_dir}")


if __name__ == "__main__":
    main()
