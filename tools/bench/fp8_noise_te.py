#!/usr/bin/env python
"""Does FP8 swallow the symmetric noise? Transformer Engine's real cast, beside the CPU simulation.

  python tools/bench/fp8_noise_te.py [--alphas 5 10 15 --lengths 512 2048]

The first layer's input under TE is the RMS-normalised ``X +- n`` cast to E4M3. Here the
embedding rows X (LLaMA-2-7B width, Gaussian std 0.02: the CPU table's rows, the same draw)
get the symmetric noise n = +-alpha / sqrt(L d) (the same signs as the simulation), are
rounded to BF16 as the noised embedding output is, normalised by TE's RMSNorm kernel and
quantized by TE's own quantizers: delayed (per-tensor scale from the clean activations'
amax, as its history holds), tensorwise (current scaling) and blockwise (1x128 blocks,
power-of-2 scales, as TE's Float8BlockScaling casts activations). ``concat`` quantizes both
copies as one tensor (the doubled micro-batch), ``microbatch`` each copy alone.

Per row: the share of elements where the two copies quantize to different values, and the
cosine between the quantized and the exact (float32) difference of the normalised copies;
the same after BF16 alone (no FP8), and the CPU simulation's figures
(symnoise_megatron.noise.fp8_resolution.simulate) for the same rows and noise. Writes
tools/bench/results/fp8_noise_te.json (and $OUT/fp8_noise_te.json) after every (L, alpha).
SKIPPED without CUDA/TE. ``--smallest``: 16 rows of width 128 on the CPU, torch's E4M3 round
trip and RMSNorm standing in for TE's (the dry run).
"""

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import (  # noqa: E402
    add_smallest_flag, copies_differ_and_kept, device_name, stage_device, versions, write_json,
)

E4M3_MAX = 448.0


def symmetric_noise(tokens: int, hidden: int, alpha: float, length: int, seed: int = 0) -> torch.Tensor:
    """The simulation's noise draw (fp8_resolution.simulate): the same signs for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (tokens, hidden), generator=generator).to(torch.float32) * 2 - 1
    return signs * (alpha / math.sqrt(length * hidden))


def quantizer(recipe: str, clean: torch.Tensor):
    import transformer_engine.pytorch as te
    import transformer_engine_torch as tex

    e4m3 = tex.DType.kFloat8E4M3
    if recipe == "delayed":
        amax = clean.float().abs().amax().reshape(1)
        return te.Float8Quantizer(scale=(E4M3_MAX / amax).float(), amax=torch.zeros(1, device=clean.device),
                                  fp8_dtype=e4m3, rowwise=True, columnwise=False)
    if recipe == "tensorwise":
        return te.Float8CurrentScalingQuantizer(fp8_dtype=e4m3, device=clean.device, rowwise=True, columnwise=False)
    if recipe == "blockwise":
        return te.Float8BlockQuantizer(fp8_dtype=e4m3, rowwise=True, columnwise=False, force_pow_2_scales=True,
                                       block_scaling_dim=1)
    raise ValueError(f"unknown recipe {recipe!r}")


def round_trip(recipe: str, tensor: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    quantized = quantizer(recipe, clean).quantize(tensor)
    return quantized.dequantize(dtype=torch.float32)


def torch_round_trip(recipe: str, tensor: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """The dry run's stand-in for TE's cast: torch's E4M3 with the simulation's scaling (delayed:
    the clean activations' amax, as TE's history holds it)."""
    from symnoise_megatron.noise.fp8_resolution import quantize_e4m3

    return quantize_e4m3(tensor.float(), recipe, like=clean.float() if recipe == "delayed" else None)


def measure(rows: torch.Tensor, alpha: float, length: int, recipes, norm, device: str = "cuda",
            cast=round_trip) -> list:
    from symnoise_megatron.noise.fp8_resolution import rms_norm, simulate

    tokens, hidden = rows.shape
    noise = symmetric_noise(tokens, hidden, alpha, length)
    exact_plus, exact_minus = rms_norm(rows + noise), rms_norm(rows - noise)
    x = rows.to(device, torch.bfloat16)
    n = noise.to(device, torch.bfloat16)
    with torch.no_grad():
        normed = norm(torch.cat([x + n, x - n]))
        clean = norm(x)
    plus, minus = normed[:tokens].float().cpu(), normed[tokens:].float().cpu()
    bf16 = copies_differ_and_kept(exact_plus, exact_minus, plus, minus)
    out = []
    for recipe in recipes:
        simulated = simulate(rows, alpha, length, recipe)
        for pairing in ("concat", "microbatch"):
            if pairing == "concat":
                both = cast(recipe, normed, clean).cpu()
                plus_q, minus_q = both[:tokens], both[tokens:]
            else:
                plus_q = cast(recipe, normed[:tokens], clean).cpu()
                minus_q = cast(recipe, normed[tokens:], clean).cpu()
            if not torch.isfinite(plus_q).all() or not torch.isfinite(minus_q).all():
                raise RuntimeError(f"TE's {recipe} cast returned non-finite values at alpha {alpha}, L {length}")
            differ, kept = copies_differ_and_kept(exact_plus, exact_minus, plus_q, minus_q)
            out.append(dict(recipe=recipe, pairing=pairing, hidden_size=hidden, sample_length=length, alpha=alpha,
                            te_copies_differ=differ, te_noise_kept=kept, bf16_copies_differ=bf16[0],
                            bf16_noise_kept=bf16[1], simulated_copies_differ=simulated.copies_differ,
                            simulated_noise_kept=simulated.noise_kept))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=float, nargs="+", default=[5, 10, 15])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--recipes", nargs="+", default=["delayed", "tensorwise", "blockwise"],
                        choices=["delayed", "tensorwise", "blockwise"])
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=512, help="embedding rows (the CPU table's 512)")
    parser.add_argument("--embedding-std", type=float, default=0.02)
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    where = stage_device("fp8_noise", args.smallest)
    if where is None:
        return 0
    from symnoise_megatron.noise.fp8_resolution import gaussian_embeddings, rms_norm

    if args.smallest:
        args.tokens, args.hidden_size, args.lengths, args.alphas = 16, 128, [512], [5.0]
        norm, cast = lambda x: rms_norm(x.float()).to(x.dtype), torch_round_trip
    else:
        import transformer_engine.pytorch as te

        norm, cast = te.RMSNorm(args.hidden_size, eps=1e-5, dtype=torch.bfloat16, device="cuda"), round_trip
    rows = gaussian_embeddings(args.tokens, args.hidden_size, args.embedding_std)
    device = device_name()
    payload = {"device": device, "versions": versions(), "dry_run": args.smallest,
               "command": "python tools/bench/fp8_noise_te.py " + " ".join(argv or sys.argv[1:]),
               "rows_source": f"Gaussian std {args.embedding_std:g}, {args.tokens} rows, d {args.hidden_size}", "rows": []}
    results = payload["rows"]
    for length in args.lengths:
        for alpha in args.alphas:
            results += measure(rows, alpha, length, args.recipes, norm, where, cast)
            write_json("fp8_noise_te.json", payload, dry_run=args.smallest)
    print(f"\n{device}: d {args.hidden_size}, {args.tokens} Gaussian rows (std {args.embedding_std:g}); TE cast vs the CPU simulation\n")
    print("| L | alpha | recipe | pairing | copies differ (TE) | cosine kept (TE) | BF16 only | simulated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sample_length']} | {r['alpha']:g} | {r['recipe']} | {r['pairing']} | {r['te_copies_differ']:.1%} | "
              f"{r['te_noise_kept']:.3f} | {r['bf16_copies_differ']:.1%} / {r['bf16_noise_kept']:.3f} | "
              f"{r['simulated_copies_differ']:.1%} / {r['simulated_noise_kept']:.3f} |")
    print("written:", ", ".join(write_json("fp8_noise_te.json", payload, dry_run=args.smallest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
