"""The embedding noise of every kind, as one pure function of integer coordinates."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from symnoise_megatron.noise import counter_rng
from symnoise_megatron.noise.config import NoiseConfig

_TWO_PI = 2.0 * math.pi


def per_token(value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-row [b] tensor to per-token [b, s]; per-token tensors pass through."""
    if value.dim() == 1:
        return value[:, None].expand_as(positions)
    if value.shape != positions.shape:
        raise ValueError(f"expected shape {tuple(positions.shape)} or [b], got {tuple(value.shape)}")
    return value


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """23 of the bits as a float32 in (0, 1), exactly (u + 0.5) / 2**23."""
    return ((bits >> 9).to(torch.float32) + 0.5) * (2.0**-23)


def unit_noise(kind: str, token_key: torch.Tensor, hidden_index: torch.Tensor) -> torch.Tensor:
    """eps of the given kind for each (token, hidden index), float32 [..., h]."""
    bits = counter_rng.element_bits(token_key, hidden_index)
    if kind == "uniform":
        return _unit_interval(bits) * 2.0 - 1.0
    if kind in ("bernoulli", "symmetric"):
        return 1.0 - 2.0 * (bits >> 31).to(torch.float32)
    if kind == "gaussian":
        second = counter_rng.element_bits(token_key, hidden_index | counter_rng.STREAM_BIT)
        radius = torch.sqrt(-2.0 * torch.log(_unit_interval(bits)))
        return radius * torch.cos(_TWO_PI * _unit_interval(second))
    raise ValueError(f"no noise distribution for kind {kind!r}")


def noise_scale(alpha: float, lengths: torch.Tensor, hidden_size: int) -> torch.Tensor:
    """``alpha / sqrt(L * d)`` per sequence (float32), 0 where a length is 0."""
    lengths = lengths.to(torch.float64)
    scale = alpha / torch.sqrt(lengths.clamp(min=1) * hidden_size)
    return torch.where(lengths > 0, scale, torch.zeros_like(scale)).to(torch.float32)


def embedding_noise(
    config: NoiseConfig,
    sample_uids: torch.Tensor,
    positions: torch.Tensor,
    lengths: torch.Tensor,
    hidden_size: int,
    hidden_slice: Optional[slice] = None,
    sign: Union[int, torch.Tensor] = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The scaled noise ``alpha / sqrt(L_i * d) * eps`` for a micro-batch, [b, s, h].

    Every element is a pure function of ``(config.seed, sample uid, position, hidden
    index)``, so any rank, parallel layout or resumed run that asks for the same coordinates
    gets the same value.

    Args:
        config: kind, alpha and seed (``pairing`` is not used here).
        sample_uids: [b] global sample index of each row, or [b, s] per token for packed
            rows (several samples in one row).
        positions: [b, s] position of each token within its own sample (global positions
            under context parallelism; restarting at 0 for each sample of a packed row).
        lengths: [b] or [b, s] real (unpadded) length L of the sample a token belongs to.
            Tokens with ``position >= length`` are padding and get exactly 0.
        hidden_size: d, the full hidden size (never the tensor-parallel shard).
        hidden_slice: the part of the hidden dimension to produce (default: all of it).
        sign: +1, or -1 for the symmetric partner; an int or a [b] tensor per row.
        dtype: dtype of the result.
    """
    if positions.dim() != 2:
        raise ValueError(f"positions must be [b, s], got shape {tuple(positions.shape)}")
    positions = positions.to(torch.int64)
    sample_uids = per_token(sample_uids.to(positions.device), positions)
    hidden_slice = hidden_slice or slice(0, hidden_size)
    start, stop, step = hidden_slice.indices(hidden_size)
    hidden_index = torch.arange(start, stop, step, device=positions.device, dtype=torch.int64)
    if not config.enabled:
        return torch.zeros(*positions.shape, hidden_index.numel(), dtype=dtype, device=positions.device)

    token_key = counter_rng.token_keys(
        counter_rng.sample_keys(config.seed, sample_uids), positions
    )
    scale = token_scales(config.alpha, positions, lengths, hidden_size, sign)
    eps = unit_noise(config.kind, token_key, hidden_index)
    return (eps * scale[..., None]).to(dtype)


def token_scales(alpha: float, positions: torch.Tensor, lengths: torch.Tensor, hidden_size: int,
                 sign: Union[int, torch.Tensor] = 1) -> torch.Tensor:
    """The signed scale of each token, [b, s] float32: ``sign * alpha / sqrt(L * d)`` on
    real tokens, exactly 0 on padding (``position >= length``)."""
    lengths = per_token(lengths.to(positions.device), positions)
    scale = noise_scale(alpha, lengths, hidden_size)
    real = (positions >= 0) & (positions < lengths)
    scale = torch.where(real, scale, torch.zeros_like(scale))
    if isinstance(sign, torch.Tensor):
        return scale * sign.to(scale)[:, None]
    return scale * check_sign(sign)


def check_sign(sign: int) -> int:
    """A whole micro-batch's sign: +1, or -1 for the symmetric partner."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    return sign
