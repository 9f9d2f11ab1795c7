"""A counter-based generator: random bits as a pure function of integer coordinates.

Each value is ``fmix32`` (MurmurHash3's finaliser, a bijection on 32-bit words with full
avalanche) chained over the coordinates. Only 32-bit words are ever multiplied, split into
16-bit halves, so every intermediate fits in int64 on any device, and a uint32 kernel (Triton,
CUDA) reproduces the same bits exactly.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_M1 = 0x85EBCA6B
_M2 = 0xC2B2AE35
_SEED_SALT = 0x9E3779B9
# The second stream (gaussian's second uniform) flips the top bit of the hidden index.
STREAM_BIT = 1 << 31


def _mul32_(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x = (x * constant) mod 2**32 in place, for int64 x in [0, 2**32), without int64 overflow."""
    high = x * (constant >> 16)
    high &= 0xFFFF
    high <<= 16
    x *= constant & 0xFFFF
    x += high
    x &= _MASK32
    return x


def fmix32(x: torch.Tensor) -> torch.Tensor:
    # In place after the first operation (which copies): the noise's [b, s, h] int64
    # temporaries dominate its cost on CPU.
    x = x ^ (x >> 16)
    _mul32_(x, _M1)
    x ^= x >> 13
    _mul32_(x, _M2)
    x ^= x >> 16
    return x


def fmix32_int(x: int) -> int:
    """The same function on a Python int (for scalars and for kernels' host-side keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 13
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """The 32-bit key every sample key starts from."""
    return fmix32_int(seed ^ _SEED_SALT)


def sample_keys(seed: int, sample_uids: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per sample uid (int64, any shape, uids in [0, 2**63))."""
    uids = sample_uids.to(torch.int64)
    key = seed_key(seed)
    key = fmix32((uids & _MASK32) ^ key)
    return fmix32(key ^ (uids >> 32))


def token_keys(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A 32-bit key per token from its sample key and its position in the sample."""
    return fmix32(keys ^ (positions.to(torch.int64) & _MASK32))


def element_bits(token_key: torch.Tensor, hidden_index: torch.Tensor) -> torch.Tensor:
    """32 random bits per (token, hidden index): ``token_key[..., None]`` x ``hidden_index``."""
    return fmix32(token_key.unsqueeze(-1) ^ hidden_index)
