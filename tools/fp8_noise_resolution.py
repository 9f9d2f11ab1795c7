#!/usr/bin/env python
"""Does FP8 (E4M3) swallow the embedding noise? The simulation of symnoise_megatron.noise.fp8_resolution.

  python tools/fp8_noise_resolution.py                          # LLaMA-2-7B and 70B widths, Gaussian rows
  python tools/fp8_noise_resolution.py --hf-dir /models/Llama-2-7b-hf   # that model's own embedding rows

For each hidden size, sample length L, alpha and recipe: the median |noise| / E4M3 step of
the first layer's normalised inputs, the fraction of elements where the two symmetric copies
still quantize differently, and the cosine between the quantized and the exact difference of
the copies. Without --hf-dir the rows are Gaussian with --embedding-std (LLaMA's init std
0.02 by default: a stated assumption, not a measurement of trained weights).
"""

import argparse
import sys

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.noise.fp8_resolution import gaussian_embeddings, sampled_rows, simulate

WIDTHS = {"llama2-7b": 4096, "llama2-70b": 8192}


def embedding_sources(args):
    if not args.hf_dir:
        return [(f"{name} (Gaussian rows, std {args.embedding_std:g})", gaussian_embeddings(args.tokens, width, args.embedding_std), None)
                for name, width in WIDTHS.items()]
    from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader

    reader = HFCheckpointReader(args.hf_dir)
    names = set(reader.names())
    embedding = next((n for n in ("model.embed_tokens.weight", "model.decoder.embed_tokens.weight") if n in names), None)
    if embedding is None:
        raise ValueError(f"{args.hf_dir}: no embed_tokens weight")
    norm = "model.layers.0.input_layernorm.weight"
    return [(args.hf_dir, sampled_rows(reader.get(embedding), args.tokens), reader.get(norm).float() if norm in names else None)]


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", help="take embedding rows (and the first norm's weight) from this checkpoint")
    parser.add_argument("--embedding-std", type=float, default=0.02)
    parser.add_argument("--alphas", type=float, nargs="+", default=[5, 10, 15])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--recipes", nargs="+", default=["tensorwise", "blockwise"], choices=["tensorwise", "delayed", "blockwise"])
    parser.add_argument("--tokens", type=int, default=512, help="embedding rows sampled")
    args = parser.parse_args(argv)
    print("| rows | d | L | alpha | recipe | noise / E4M3 step | copies differ | cosine kept | survives |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rows, norm in embedding_sources(args):
        for length in args.lengths:
            for alpha in args.alphas:
                for recipe in args.recipes:
                    r = simulate(rows, alpha, length, recipe, norm)
                    print(f"| {name} | {r.hidden_size} | {length} | {alpha:g} | {recipe} | {r.noise_to_step:.2f} | "
                          f"{r.copies_differ:.1%} | {r.noise_kept:.3f} | {'yes' if r.noise_survives else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
