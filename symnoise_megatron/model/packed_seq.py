"""Packed rows on Transformer Engine's ``thd`` path: megatron-core's ``PackedSeqParams`` and the
loss positions of rows laid end to end.

The local spec keeps packed samples apart with a dense block-diagonal causal mask. TE's fused
attention takes no such mask: it needs the boundaries of the samples as cumulative lengths
over the micro-batch's rows laid end to end (``[1, b * s]``, which is also the only batch
shape megatron-core's ``thd`` attention accepts). The boundaries themselves
(:class:`~symnoise_megatron.data.microbatch.ThdSegments`) are taken on the host when the
micro-batch is staged for the device (``data.microbatch.stage``, or ``MicroBatch.to``): nothing here reads a
device tensor back.
"""

from __future__ import annotations

import torch

from symnoise_megatron.data.microbatch import ThdSegments


def packed_seq_params(segments: ThdSegments):
    """megatron-core ``PackedSeqParams`` (``qkv_format="thd"``) of packed rows laid end to end,
    from their segments (already where the model runs)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=segments.cu_seqlens, cu_seqlens_kv=segments.cu_seqlens,
        cu_seqlens_q_padded=segments.cu_seqlens_padded, cu_seqlens_kv_padded=segments.cu_seqlens_padded,
        max_seqlen_q=segments.max_seqlen, max_seqlen_kv=segments.max_seqlen,
    )


def thd_loss_positions(positions: torch.Tensor, rows: int, seq: int) -> torch.Tensor:
    """Loss positions given in megatron's ``[s, b]`` token order (``MicroBatch.positions_with_loss``)
    as indices into the rows laid end to end (``[b * s]``: row-major), without a host sync."""
    return (positions % rows) * seq + positions // rows
