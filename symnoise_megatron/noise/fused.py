"""One fused pass over the embedding output: ``out = x + scale * eps`` with eps drawn in-kernel.

The torch reference (:func:`embedding_noise`) materialises the hidden index, the 32-bit keys
and the noise as [b, s, h] tensors before the add: about ten full-size temporaries. The
Triton kernel reads ``x`` once, writes ``out`` once, and computes the same counter-based
bits in registers: ``counter_rng``'s fmix32 on uint32 words (whose 16-bit-split multiplies
are exactly uint32 multiplies). Per-token inputs (the 32-bit token key and the signed,
padding-masked scale) come from the reference's own functions, so both paths share every
rule but the arithmetic.

Uniform, bernoulli and symmetric noise are bit-identical to the reference (integer
arithmetic, then float operations that are exact or rounded once). Gaussian noise uses
log/sqrt/cos, whose last bit may differ between libm implementations.

``TRITON_INTERPRET=1`` runs the kernel on CPU (slowly), which is how CI checks the bits.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from symnoise_megatron.noise import counter_rng
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import per_token, token_scales

_KINDS = {"uniform": 0, "bernoulli": 1, "symmetric": 1, "gaussian": 2}


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


def token_noise_inputs(config: NoiseConfig, sample_uids, positions, lengths, hidden_size, sign=1):
    """The per-token key (int64 holding 32 bits) and signed, padding-masked scale, [b, s]."""
    positions = positions.to(torch.int64)
    uids = per_token(sample_uids.to(positions.device), positions)
    key = counter_rng.token_keys(counter_rng.sample_keys(config.seed, uids), positions)
    return key.contiguous(), token_scales(config.alpha, positions, lengths, hidden_size, sign).contiguous()


def add_noise_fused(output: torch.Tensor, config: NoiseConfig, sample_uids, positions, lengths,
                    sign=1, hidden_size=None, block: int = 1024) -> torch.Tensor:
    """``output + embedding_noise(...)`` in one kernel; ``output`` is [b, s, h] (any strides
    with a contiguous hidden dimension). Returns a new tensor of the same strides."""
    batch, seq, hidden = output.shape
    key, scale = token_noise_inputs(config, sample_uids, positions, lengths, hidden_size or hidden, sign)
    key, scale = key.to(output.device), scale.to(output.device)
    result = torch.empty_like(output)
    block = min(block, 1 << (hidden - 1).bit_length())
    grid = (batch * seq, -(-hidden // block))
    _kernel()[grid](output, result, key, scale, seq, hidden, output.stride(0), output.stride(1),
                    result.stride(0), result.stride(1), KIND=_KINDS[config.kind], BLOCK=block)
    return result
