"""Does FP8 swallow the embedding noise? A simulation with torch's float8 dtypes.

Under Transformer Engine the first layer's input ``X + n`` is RMS-normalised in high
precision and the normalised activations are cast to E4M3 for the QKV GEMM. The noise
survives that cast only where it moves a value across an E4M3 rounding boundary; E4M3 keeps
3 mantissa bits, so its step is 1/16 to 1/8 of a value's magnitude. This module builds the
normalised activations of real (or Gaussian) embedding rows with and without the symmetric
noise, quantizes them as TE does (per-tensor current scaling, or 1x128 blocks) and reports:

- ``noise_to_step``: median over elements of |normalised noise| / E4M3 step at that value;
- ``copies_differ``: the fraction of elements where Q(X + n) != Q(X - n);
- ``noise_kept``: the cosine between Q(X + n) - Q(X - n) and the unquantized difference
  (after normalisation): how faithfully the quantized GEMM inputs carry the symmetric pair
  (1 = exactly; rounding replaces it with its own pattern as it falls).

Both copies are quantized with the clean activations' scaling factors, so only the rounding
decides; that is what the concat pairing does (one tensor, one scale) to within amax's
fraction-of-a-percent movement.

The noise per element is ``alpha / sqrt(L * d)``: it shrinks with the sample length L and
the hidden size d, while the normalised activations do not, so long samples of wide models
are where FP8 can swallow it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

E4M3_MAX = 448.0
E4M3_MANTISSA_BITS = 3
E4M3_MIN_NORMAL_EXPONENT = -6
# Below these, the symmetric copies are judged not to differ usefully in FP8.
MIN_COPIES_DIFFER = 0.8
MIN_NOISE_KEPT = 0.8


@dataclass
class Resolution:
    hidden_size: int
    sample_length: int
    alpha: float
    recipe: str
    noise_to_step: float
    copies_differ: float
    noise_kept: float

    @property
    def noise_survives(self) -> bool:
        return self.copies_differ >= MIN_COPIES_DIFFER and self.noise_kept >= MIN_NOISE_KEPT


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _scales(y: torch.Tensor, recipe: str) -> torch.Tensor:
    """The factor that maps ``y`` onto E4M3's range: per tensor, or per 1x128 block of a row."""
    if recipe in ("tensorwise", "delayed"):  # delayed uses a history of amaxes; one step's amax here
        return E4M3_MAX / y.abs().amax().clamp(min=1e-12)
    if recipe == "blockwise":
        width = y.shape[-1]
        padded = torch.nn.functional.pad(y, (0, -width % 128))  # a short last block, as TE pads it
        blocks = padded.reshape(*y.shape[:-1], -1, 128)
        scales = (E4M3_MAX / blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12)).expand_as(blocks)
        return scales.reshape(padded.shape)[..., :width]
    raise ValueError(f"unknown FP8 recipe {recipe!r} (delayed, tensorwise, blockwise)")


def quantize_e4m3(y: torch.Tensor, recipe: str = "tensorwise", like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y`` after a round trip through E4M3 with the recipe's scaling (float32 out), the
    scaling factors taken from ``like`` when given."""
    scale = _scales(y if like is None else like, recipe)
    return (y * scale).to(torch.float8_e4m3fn).to(torch.float32) / scale


def e4m3_step(y: torch.Tensor, recipe: str = "tensorwise") -> torch.Tensor:
    """The spacing of E4M3 values around each element of ``y``, in ``y``'s units."""
    scale = _scales(y, recipe)
    scaled = (y * scale).abs().clamp(min=2.0 ** E4M3_MIN_NORMAL_EXPONENT)
    return torch.exp2(torch.floor(torch.log2(scaled)) - E4M3_MANTISSA_BITS) / scale


def simulate(embeddings: torch.Tensor, alpha: float, sample_length: int, recipe: str = "tensorwise",
             norm_weight: Optional[torch.Tensor] = None, seed: int = 0) -> Resolution:
    """The resolution figures for rows ``embeddings`` [tokens, d] (float32) under symmetric noise."""
    tokens, hidden = embeddings.shape
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (tokens, hidden), generator=generator).to(torch.float32) * 2 - 1
    noise = signs * (alpha / math.sqrt(sample_length * hidden))
    plus, minus = rms_norm(embeddings + noise, norm_weight), rms_norm(embeddings - noise, norm_weight)
    clean = rms_norm(embeddings, norm_weight)
    # Both copies with the clean activations' scaling factors: the rounding alone decides
    # (amax moves by a fraction of a percent with the noise, which would shift every value).
    quantized_plus, quantized_minus = quantize_e4m3(plus, recipe, clean), quantize_e4m3(minus, recipe, clean)
    difference, kept_difference = (plus - minus).flatten(), (quantized_plus - quantized_minus).flatten()
    kept = torch.nn.functional.cosine_similarity(difference, kept_difference, dim=0)
    normalised_noise = (plus - minus).abs() / 2
    return Resolution(
        hidden_size=hidden, sample_length=sample_length, alpha=alpha, recipe=recipe,
        noise_to_step=float((normalised_noise / e4m3_step(clean, recipe)).median()),
        copies_differ=float((quantized_plus != quantized_minus).float().mean()),
        noise_kept=float(kept),
    )


def gaussian_embeddings(tokens: int, hidden: int, std: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)) * std


def sampled_rows(weight: torch.Tensor, tokens: int, seed: int = 0) -> torch.Tensor:
    """``tokens`` random rows of an embedding table, float32."""
    index = torch.randint(0, weight.shape[0], (tokens,), generator=torch.Generator().manual_seed(seed))
    return weight[index].detach().to(torch.float32).cpu()


def fp8_warning(resolution: Resolution) -> Optional[str]:
    """A start-up warning when the quantized first-layer inputs lose the symmetric pair."""
    if resolution.noise_survives:
        return None
    return (f"FP8 ({resolution.recipe} scaling) keeps {resolution.noise_kept:.0%} of the symmetric noise at the first "
            f"layer's inputs (copies differ in {resolution.copies_differ:.0%} of elements; noise / E4M3 step "
            f"{resolution.noise_to_step:.2f} at L={resolution.sample_length}, d={resolution.hidden_size}, "
            f"alpha={resolution.alpha:g}). Keep the first layer in BF16 with --first-last-layers-bf16 "
            "--num-layers-at-start-in-bf16 1 --num-layers-at-end-in-bf16 0 (tensorwise or blockwise recipe), "
            "or raise --noise-alpha")


def check_first_layer(embedding_weight: torch.Tensor, alpha: float, sample_length: int, recipe: str,
                      tokens: int = 512) -> Optional[str]:
    """The start-up check of an FP8 run: this model's own embedding rows at the data's mean
    sample length. Returns the warning to log, or None when the noise survives."""
    return fp8_warning(simulate(sampled_rows(embedding_weight, tokens), alpha, max(1, sample_length), recipe))
