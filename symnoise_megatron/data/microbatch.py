"""Micro-batches as the forward step consumes them, packed rows' thd segments, and the pairing of
a symmetric step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch

from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding import NoiseBatch
from symnoise_megatron.noise.embedding_noise import per_token


def attention_mask_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """megatron's boolean mask [b, 1, s, s] (True = masked): causal within each sample.

    A packed row's samples start where the position restarts at 0, so attention never
    crosses from one sample into another.
    """
    segments = torch.cumsum((positions == 0).to(torch.int64), dim=1)
    same_segment = segments[:, :, None] == segments[:, None, :]
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return ~(same_segment & causal)[:, None]


class ThdSegments(NamedTuple):
    """Packed rows laid end to end (``[b * s]``) as Transformer Engine's ``thd`` sequences.

    Each sample is one sequence; the padding after a row's last sample (and an empty filler row,
    all padding) belongs to the sequence before it as padding, so

    - ``cu_seqlens``: cumulative real lengths (what attention and the loss see);
    - ``cu_seqlens_padded``: cumulative spans in memory, real length plus the padding after it
      (where each sequence starts in the ``[b * s]`` tokens; rope positions run through them);
    - ``max_seqlen``: the longest span, so rope's table covers the padding positions too.
    """

    cu_seqlens: torch.Tensor         # [n + 1] int32
    cu_seqlens_padded: torch.Tensor  # [n + 1] int32
    max_seqlen: int

    def to(self, device) -> "ThdSegments":
        return ThdSegments(self.cu_seqlens.to(device), self.cu_seqlens_padded.to(device), self.max_seqlen)


def thd_segments(position_ids: torch.Tensor, lengths: torch.Tensor) -> ThdSegments:
    """The sequences of ``[b, s]`` rows laid end to end, from each token's position in its
    sample and its sample's real length (``lengths`` per token [b, s], or per row [b]).

    A sample starts where its position is 0; every row starts a sequence (an empty filler row
    is one sequence of real length 0). Host tensors only: the boundaries are the host's to know
    when it builds the micro-batch (a device tensor here would be a sync per micro-batch)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
    if position_ids.device.type != "cpu" or lengths.device.type != "cpu":
        raise ValueError("thd segments are computed from host tensors, before the micro-batch moves (MicroBatch.to)")
    positions = position_ids.to(torch.int64)
    rows, seq = positions.shape
    lengths = lengths.to(torch.int64)
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


def loss_positions(loss_mask: torch.Tensor) -> torch.Tensor:
    """Flat indices, in megatron's [s, b] token order, of the tokens ``loss_mask`` [b, s] keeps.

    A micro-batch without any loss token keeps its first position (its loss is masked out
    downstream), so the output layer and the tensor-parallel cross entropy still run on every rank.
    """
    positions = loss_mask.t().reshape(-1).nonzero().squeeze(1)
    return positions if positions.numel() else positions.new_zeros(1)


@dataclass
class MicroBatch:
    """One micro-batch. Shapes are [b, s] unless stated.

    Attributes:
        tokens: input token ids.
        labels: next-token targets.
        loss_mask: 1 on tokens whose prediction counts (response tokens), else 0.
        position_ids: position of each token within its own sample (padded rows: 0, 1, ...
            through the padding; packed rows restart at 0 for each sample).
        sample_uids: [b], or [b, s] for packed rows: global consumed-sample index.
        lengths: [b] for padded rows (one sample each), or [b, s] for packed rows: real length
            of each token's sample.
        sign: +1/-1, or a [b] tensor per row: the symmetric copy each row carries.
        loss_positions: flat indices of the loss tokens in megatron's [s, b] order, taken from
            ``loss_mask`` on the host by :meth:`to` so that the device never waits to count them;
            None until then.
        packed_segments: packed rows' boundaries for Transformer Engine's thd attention, taken
            on the host by :meth:`to` like ``loss_positions``; None until then and for padded rows.

    There is no dense attention mask: only megatron-core's local spec reads one, and
    :meth:`attention_mask` builds it where the tokens are, when that spec runs.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    sample_uids: torch.Tensor
    lengths: torch.Tensor
    sign: Union[int, torch.Tensor] = 1
    loss_positions: Optional[torch.Tensor] = None
    packed_segments: Optional[ThdSegments] = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def real_tokens(self) -> torch.Tensor:
        """[b, s] True on the tokens of samples, False on padding."""
        return self.position_ids < per_token(self.lengths, self.position_ids)

    @property
    def packed(self) -> bool:
        """Several samples per row (per-token lengths), as ``pack`` builds them."""
        return self.lengths.dim() == 2

    def noise_batch(self) -> NoiseBatch:
        return NoiseBatch(self.sample_uids, self.position_ids, self.lengths, self.sign)

    def attention_mask(self) -> torch.Tensor:
        """megatron's boolean mask (True = masked) for the local spec, on the tokens' device:
        causal within each sample, [b, 1, s, s] for packed rows; padded rows all share one
        causal [1, 1, s, s] (their padding follows the sample, so causality alone keeps it out)."""
        return attention_mask_from_positions(self.position_ids if self.packed else self.position_ids[:1])

    def to(self, device) -> "MicroBatch":
        """The micro-batch on ``device``, with what the host knows taken first (loss positions,
        packed rows' thd segments), so that the step never waits on the device to learn them."""
        segments = self.packed_segments
        if segments is None and self.packed:
            segments = thd_segments(self.position_ids, self.lengths)
        on_host = dataclasses.replace(self, loss_positions=self.positions_with_loss())
        return dataclasses.replace(
            on_host,
            packed_segments=segments.to(device) if segments is not None else None,
            **{
                f.name: getattr(on_host, f.name).to(device)
                for f in dataclasses.fields(on_host)
                if isinstance(getattr(on_host, f.name), torch.Tensor)
            },
        )

    def positions_with_loss(self) -> torch.Tensor:
        return self.loss_positions if self.loss_positions is not None else loss_positions(self.loss_mask)

    def truncated(self, length: int) -> "MicroBatch":
        """The first ``length`` positions of every row."""
        cut = {name: getattr(self, name)[:, :length] for name in ("tokens", "labels", "loss_mask", "position_ids")}
        for name in ("sample_uids", "lengths"):
            value = getattr(self, name)
            if value.dim() == 2:
                cut[name] = value[:, :length]
        return dataclasses.replace(self, loss_positions=None, packed_segments=None, **cut)

    def doubled(self) -> "MicroBatch":
        """``concat`` pairing: ``[X + s*eps ; X - s*eps]`` with everything duplicated."""
        return concatenate([self.with_sign(1), self.with_sign(-1)])

    def with_sign(self, sign: int) -> "MicroBatch":
        return dataclasses.replace(self, sign=sign)


def concatenate(microbatches: Sequence[MicroBatch]) -> MicroBatch:
    """Rows of several micro-batches as one; the sign becomes per row."""
    fields = {
        f.name: torch.cat([getattr(mb, f.name) for mb in microbatches])
        for f in dataclasses.fields(MicroBatch)
        if f.name not in ("sign", "loss_positions", "packed_segments")
    }
    signs = [
        mb.sign.to(torch.int64) if isinstance(mb.sign, torch.Tensor) else torch.full((mb.size,), mb.sign)
        for mb in microbatches
    ]
    sign = torch.cat(signs)
    return MicroBatch(**fields, sign=int(sign[0]) if bool((sign == sign[0]).all()) else sign)


def paired_microbatches(
    microbatches: Iterable[MicroBatch], noise: NoiseConfig
) -> Iterator[MicroBatch]:
    """The micro-batches a step runs: as given, or both symmetric copies of each.

    ``concat`` yields each micro-batch doubled; ``microbatch`` yields it twice, with the
    signs +1 then -1, so the number of micro-batches per step doubles instead.
    """
    for microbatch in microbatches:
        if not noise.is_symmetric:
            yield microbatch
        elif noise.pairing == "concat":
            yield microbatch.doubled()
        else:
            yield microbatch.with_sign(1)
            yield microbatch.with_sign(-1)


def context_parallel_index(seq_length: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """The sequence positions a context-parallel rank holds, as megatron-core splits them.

    The sequence is cut into ``2 * cp_size`` chunks and rank r keeps chunks r and
    ``2 * cp_size - 1 - r``, which balances causal attention work across ranks.
    """
    if seq_length % (2 * cp_size):
        raise ValueError(
            f"sequence length {seq_length} is not divisible by 2 x context-parallel size {cp_size}"
        )
    chunk = seq_length // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([first, torch.arange(second_start, second_start + chunk)])
