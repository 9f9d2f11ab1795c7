"""Packed rows in Transformer Engine's ``thd`` layout: cumulative sequence lengths from positions.

The local spec keeps packed samples apart with a dense block-diagonal causal mask. TE's fused
attention takes no such mask: it needs the boundaries of the samples as cumulative lengths
over the micro-batch's rows laid end to end (``[1, b * s]``, which is also the only batch
shape megatron-core's ``thd`` attention accepts). Each sample is one sequence; the padding
after a row's last sample (and an empty filler row, all padding) belongs to the sequence
before it as padding, so

- ``cu_seqlens``: cumulative real lengths (what attention and the loss see);
- ``cu_seqlens_padded``: cumulative spans in memory, real length plus the padding after it
  (where each sequence starts in the ``[b * s]`` tokens; rope positions run through them);
- ``max_seqlen``: the longest span, so rope's table covers the padding positions too.

A sample starts where its position is 0; every row starts a sequence (an empty filler row is
one sequence of real length 0).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class ThdSegments(NamedTuple):
    cu_seqlens: torch.Tensor         # [n + 1] int32
    cu_seqlens_padded: torch.Tensor  # [n + 1] int32
    max_seqlen: int


def thd_segments(position_ids: torch.Tensor, lengths: torch.Tensor) -> ThdSegments:
    """The sequences of ``[b, s]`` rows laid end to end, from each token's position in its
    sample and its sample's real length (``lengths`` per token [b, s], or per row [b])."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
    positions = position_ids.detach().to("cpu", torch.int64)
    rows, seq = positions.shape
    lengths = lengths.detach().to("cpu", torch.int64)
    if lengths.dim() == 1:
        lengths = lengths[:, None].expand(rows, seq)
    if lengths.shape != positions.shape:
        raise ValueError(f"lengths must be [b] or [b, s] = {tuple(positions.shape)}, got {tuple(lengths.shape)}")
    if bool((positions[:, 0] != 0).any()):
        bad = int((positions[:, 0] != 0).nonzero()[0])
        raise ValueError(f"row {bad} does not start a sample (its first position is {int(positions[bad, 0])}, not 0)")
    starts = (positions.reshape(-1) == 0).nonzero().squeeze(1)
    total = rows * seq
    padded = torch.cat([starts, torch.tensor([total])])
    spans = padded[1:] - padded[:-1]
    real = lengths.reshape(-1)[starts]
    if bool((real > spans).any()):
        index = int((real > spans).nonzero()[0])
        raise ValueError(f"the sample starting at token {int(starts[index])} (row {int(starts[index]) // seq}) has "
                         f"length {int(real[index])} but only {int(spans[index])} tokens before the next sample")
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), real.cumsum(0)])
    return ThdSegments(cu_seqlens.to(torch.int32), padded.to(torch.int32), int(spans.max()))


def packed_seq_params(position_ids: torch.Tensor, lengths: torch.Tensor, device: Optional[torch.device] = None):
    """megatron-core ``PackedSeqParams`` (``qkv_format="thd"``) for ``[b, s]`` packed rows laid
    end to end; the cumulative lengths on ``device`` (default: the positions')."""
    from megatron.core.packed_seq_params import PackedSeqParams

    segments = thd_segments(position_ids, lengths)
    device = position_ids.device if device is None else device
    cu_seqlens = segments.cu_seqlens.to(device)
    cu_seqlens_padded = segments.cu_seqlens_padded.to(device)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens_padded, cu_seqlens_kv_padded=cu_seqlens_padded,
        max_seqlen_q=segments.max_seqlen, max_seqlen_kv=segments.max_seqlen,
    )


def thd_loss_positions(positions: torch.Tensor, rows: int, seq: int) -> torch.Tensor:
    """Loss positions given in megatron's ``[s, b]`` token order (``MicroBatch.positions_with_loss``)
    as indices into the rows laid end to end (``[b * s]``: row-major), without a host sync."""
    return (positions % rows) * seq + positions // rows
