"""One fused pass over the embedding output: ``out = x + scale * eps`` with eps drawn in-kernel.

The torch reference (:func:`embedding_noise`) materialises the hidden index, the 32-bit keys
and the noise as [b, s, h] tensors before the add: about ten full-size temporaries. The
Triton kernel reads ``x`` once, writes ``out`` once, and computes the same counter-based
bits in registers: ``counter_rng``'s fmix32 on uint32 words (whose 16-bit-split multiplies
are exactly uint32 multiplies). The per-token work (keys, the
float64 scale, the padding mask, the sign) happens in the same launch, so a micro-batch costs
one kernel and one read and write of the activations.

Uniform, bernoulli and symmetric noise are bit-identical to the reference (integer
arithmetic, then float operations that are exact or rounded once). Gaussian noise uses
log/sqrt/cos, whose last bit may differ between libm implementations.

The noise is additive and depends on no input that carries a gradient, so the kernel runs
inside an ``autograd.Function`` whose backward hands the gradient through unchanged: the
embedding weight, and every layer behind it under activation recomputation, trains as on the
reference path (a raw launch into a new tensor would leave the result without a ``grad_fn``).

``TRITON_INTERPRET=1`` runs the kernel on CPU (slowly), which is how CI checks the bits and
the gradient.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch

from symnoise_megatron.noise import counter_rng
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import check_sign, per_token

_KINDS = {"uniform": 0, "bernoulli": 1, "symmetric": 1, "gaussian": 2}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_noise_usable(tensor: torch.Tensor) -> bool:
    """Whether :func:`add_noise_fused` runs for ``tensor``: CUDA with Triton, or the interpreter."""
    if not triton_available() or tensor.stride(-1) != 1:
        return False
    if tensor.is_cuda:
        return True
    # The interpreter computes with numpy, which has no bfloat16 (it reads garbage).
    return os.environ.get("TRITON_INTERPRET") == "1" and tensor.dtype in (torch.float32, torch.float16)


def _kernel():
    # Imported on first use: triton.jit reads TRITON_INTERPRET when it decorates.
    from symnoise_megatron.noise.triton_kernel import noise_kernel

    return noise_kernel


@functools.lru_cache(maxsize=64)
def _alpha_on(device: torch.device, alpha: float) -> torch.Tensor:
    """alpha as a float64 tensor: a scalar kernel argument would be float32, and the scale
    is computed in float64 like the reference's ``noise_scale``."""
    return torch.tensor([alpha], dtype=torch.float64, device=device)


class _AddNoise(torch.autograd.Function):
    """``x + noise`` where the noise is a constant of the step: d(out)/d(x) is the identity."""

    @staticmethod
    def forward(ctx, output, launch):
        return launch(output)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def add_noise_fused(output: torch.Tensor, config: NoiseConfig, sample_uids, positions, lengths,
                    sign=1, hidden_size=None, block: int = 1024, tokens_per_program: Optional[int] = None) -> torch.Tensor:
    """``output + embedding_noise(...)`` in one kernel launch; ``output`` is [b, s, h] (any
    strides with a contiguous hidden dimension). Returns a new tensor of the same strides,
    differentiable in ``output`` (the gradient passes through unchanged).

    ``tokens_per_program`` (a power of two) x ``block`` is a program's tile: 2 x 1024 on CUDA
    (tools/bench/RESULTS.md); the interpreter pays per program, so it takes 128 tokens at once."""
    batch, seq, hidden = output.shape
    if (hidden_size or hidden) != hidden:
        raise ValueError(f"the fused kernel noises the whole hidden dimension ({hidden}), not a slice of {hidden_size}")
    device = output.device
    positions = positions.to(device=device, dtype=torch.int64)
    # Per-row values broadcast as stride-0 views: read per token without a copy.
    uids = per_token(sample_uids.to(device=device, dtype=torch.int64), positions)
    lengths = per_token(lengths.to(device=device, dtype=torch.int64), positions)
    per_row_sign = isinstance(sign, torch.Tensor)
    signs = sign.to(device=device, dtype=torch.int64).contiguous() if per_row_sign else uids
    block = min(block, 1 << (hidden - 1).bit_length())
    if tokens_per_program is None:
        tokens_per_program = 2 if output.is_cuda else 128
    tokens = batch * seq
    grid = (-(-tokens // tokens_per_program), -(-hidden // block))

    def launch(x: torch.Tensor) -> torch.Tensor:
        result = torch.empty_like(x)
        _kernel()[grid](
            x, result, uids, positions, lengths, signs, _alpha_on(device, config.alpha), counter_rng.seed_key(config.seed),
            1 if per_row_sign else check_sign(int(sign)), tokens, seq, hidden, x.stride(0), x.stride(1),
            result.stride(0), result.stride(1), uids.stride(0), uids.stride(1), positions.stride(0), positions.stride(1),
            lengths.stride(0), lengths.stride(1),
            KIND=_KINDS[config.kind], PER_ROW_SIGN=per_row_sign, ROUNDED_PRODUCT=x.is_cuda,
            TOKENS=tokens_per_program, BLOCK=block)
        return result

    return _AddNoise.apply(output, launch)
