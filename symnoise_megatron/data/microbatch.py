"""Micro-batches as the forward step consumes them, packed rows' thd segments, and the pairing of
a symmetric step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

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

    def to(self, device, non_blocking: bool = False) -> "ThdSegments":
        return ThdSegments(self.cu_seqlens.to(device, non_blocking=non_blocking),
                           self.cu_seqlens_padded.to(device, non_blocking=non_blocking), self.max_seqlen)

    def pin_memory(self) -> "ThdSegments":
        return ThdSegments(self.cu_seqlens.pin_memory(), self.cu_seqlens_padded.pin_memory(), self.max_seqlen)


def thd_segments(position_ids: torch.Tensor, lengths: torch.Tensor) -> ThdSegments:
    """The sequences of ``[b, s]`` rows laid end to end, from each token's position in its
    sample and its sample's real length (``lengths`` per token [b, s], or per row [b]).

    A sample starts where its position is 0; every row starts a sequence (an empty filler row
    is one sequence of real length 0). Host tensors only: the boundaries are the host's to know
    when it builds the micro-batch (a device tensor here would be a sync per micro-batch)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [b, s], got shape {tuple(position_ids.shape)}")
    if position_ids.device.type != "cpu" or lengths.device.type != "cpu":
        raise ValueError("thd segments are computed from host tensors, before the micro-batch moves (stage, MicroBatch.to)")
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


def loss_positions(loss_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Flat indices, in megatron's [s, b] token order, of the tokens ``loss_mask`` [b, s] keeps
    (None without a loss mask: a rank without the output layer reads none).

    A micro-batch without any loss token keeps its first position (its loss is masked out
    downstream), so the output layer and the tensor-parallel cross entropy still run on every rank.
    """
    if loss_mask is None:
        return None
    positions = loss_mask.t().reshape(-1).nonzero().squeeze(1)
    return positions if positions.numel() else positions.new_zeros(1)


@dataclass
class MicroBatch:
    """One micro-batch. Shapes are [b, s] unless stated.

    Attributes:
        tokens: input token ids (None on a rank without the embedding: a later pipeline stage).
        labels: next-token targets (None on a rank without the output layer).
        loss_mask: 1 on tokens whose prediction counts (response tokens), else 0 (None where
            ``labels`` is).
        position_ids: position of each token within its own sample (padded rows: 0, 1, ...
            through the padding; packed rows restart at 0 for each sample).
        sample_uids: [b], or [b, s] for packed rows: global consumed-sample index.
        lengths: [b] for padded rows (one sample each), or [b, s] for packed rows: real length
            of each token's sample.
        sign: +1/-1, or a [b] tensor per row: the symmetric copy each row carries.
        loss_positions: flat indices of the loss tokens in megatron's [s, b] order, taken from
            ``loss_mask`` on the host (:func:`stage`, :meth:`to`) so that the device never waits
            to count them; None until then, and where every position computes its logits.
        packed_segments: packed rows' boundaries for Transformer Engine's thd attention, taken
            on the host like ``loss_positions``; None until then and for padded rows.

    There is no dense attention mask: only megatron-core's local spec reads one, and
    :meth:`attention_mask` builds it where the tokens are, when that spec runs.
    """

    tokens: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    loss_mask: Optional[torch.Tensor]
    position_ids: torch.Tensor
    sample_uids: torch.Tensor
    lengths: torch.Tensor
    sign: Union[int, torch.Tensor] = 1
    loss_positions: Optional[torch.Tensor] = None
    packed_segments: Optional[ThdSegments] = None

    @property
    def size(self) -> int:
        return self.position_ids.shape[0]

    @property
    def length(self) -> int:
        """Tokens per row."""
        return self.position_ids.shape[1]

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

    def to(self, device, non_blocking: bool = False) -> "MicroBatch":
        """The micro-batch on ``device``, with what the host knows taken first (loss positions,
        packed rows' thd segments), so that the step never waits on the device to learn them."""
        segments = self.packed_segments
        if segments is None and self.packed:
            segments = thd_segments(self.position_ids, self.lengths)
        return dataclasses.replace(self, loss_positions=self.positions_with_loss(),
                                   packed_segments=segments).moved(device, non_blocking)

    def moved(self, device, non_blocking: bool = False) -> "MicroBatch":
        """Every tensor on ``device`` as it is (``non_blocking``: from pinned memory, the host does
        not wait for the copy)."""
        return self._mapped(lambda t: t.to(device, non_blocking=non_blocking),
                            lambda segments: segments.to(device, non_blocking))

    def pin_memory(self) -> "MicroBatch":
        """Every tensor in page-locked host memory, so that its copy to the GPU runs beside the
        host's work (``moved(..., non_blocking=True)``)."""
        return self._mapped(lambda t: t.pin_memory(), lambda segments: segments.pin_memory())

    def _mapped(self, tensor_map, segments_map) -> "MicroBatch":
        changes = {f.name: tensor_map(getattr(self, f.name)) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        if self.packed_segments is not None:
            changes["packed_segments"] = segments_map(self.packed_segments)
        return dataclasses.replace(self, **changes)

    def positions_with_loss(self) -> Optional[torch.Tensor]:
        return self.loss_positions if self.loss_positions is not None else loss_positions(self.loss_mask)

    def truncated(self, length: int) -> "MicroBatch":
        """The first ``length`` positions of every row."""
        cut = {name: getattr(self, name)[:, :length] for name in ("tokens", "labels", "loss_mask", "position_ids")
               if getattr(self, name) is not None}
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
    """Rows of several micro-batches as one, on their device; the sign becomes per row."""
    fields = {
        f.name: (torch.cat([getattr(mb, f.name) for mb in microbatches])
                 if getattr(microbatches[0], f.name) is not None else None)
        for f in dataclasses.fields(MicroBatch)
        if f.name not in ("sign", "loss_positions", "packed_segments")
    }
    device = microbatches[0].position_ids.device
    signs = [
        mb.sign.to(torch.int64) if isinstance(mb.sign, torch.Tensor)
        else torch.full((mb.size,), mb.sign, dtype=torch.int64, device=device)
        for mb in microbatches
    ]
    if all(not isinstance(mb.sign, torch.Tensor) for mb in microbatches):
        # Known on the host: no device read to tell whether one sign covers every row.
        uniform = len({mb.sign for mb in microbatches}) == 1
        return MicroBatch(**fields, sign=microbatches[0].sign if uniform else torch.cat(signs))
    sign = torch.cat(signs)
    return MicroBatch(**fields, sign=int(sign[0]) if bool((sign == sign[0]).all()) else sign)


@dataclass
class StagedMicroBatch:
    """A data micro-batch staged on the host for its trip to the device, and what the schedule
    runs from it: itself; both symmetric copies doubled into one micro-batch (``concat``); or the
    copies as two micro-batches (``microbatch``). Its tensors move once, when the schedule first
    asks for it, and the copies share that one device copy (``concat`` doubles it on the device).
    The loss positions and thd segments of what runs are taken on the host, by :func:`stage`."""

    data: MicroBatch
    doubled: bool = False
    signs: Tuple[Optional[int], ...] = (None,)  # None: the data's own sign
    loss_positions: Optional[torch.Tensor] = None
    packed_segments: Optional[ThdSegments] = None

    @property
    def runs(self) -> int:
        """Micro-batches the schedule runs from this one."""
        return len(self.signs)

    @property
    def rows(self) -> int:
        """Rows of each micro-batch the schedule runs."""
        return self.data.size * (2 if self.doubled else 1)

    def on_device(self, device, non_blocking: bool = False) -> List[MicroBatch]:
        """The micro-batches the schedule runs, on ``device``, sharing one copy of the data."""
        moved = self.data.moved(device, non_blocking)
        if self.doubled:
            moved = concatenate([moved.with_sign(1), moved.with_sign(-1)])
        extras = dict(
            loss_positions=None if self.loss_positions is None else self.loss_positions.to(device, non_blocking=non_blocking),
            packed_segments=None if self.packed_segments is None else self.packed_segments.to(device, non_blocking))
        return [dataclasses.replace(moved, **extras, **({} if sign is None else {"sign": sign})) for sign in self.signs]


def stage(microbatch: MicroBatch, noise: NoiseConfig, *, loss_tokens: bool = True, thd: bool = True,
          max_seqlen: Optional[int] = None, pin: bool = False) -> StagedMicroBatch:
    """``microbatch`` staged for the device under ``noise``'s pairing, on the host: the loss
    positions (``loss_tokens``; off: the model computes logits at every position) and, for packed
    rows on the thd path (``thd``), the segments of what runs, with ``max_seqlen`` fixed when given
    (static shapes); the tensors page-locked (``pin``, where there is CUDA)."""
    doubled = noise.is_symmetric and noise.pairing == "concat"
    signs = (1, -1) if noise.is_symmetric and noise.pairing == "microbatch" else (None,)
    mask, positions, lengths = microbatch.loss_mask, microbatch.position_ids, microbatch.lengths
    if doubled:
        mask = None if mask is None else torch.cat([mask, mask])
        positions, lengths = torch.cat([positions, positions]), torch.cat([lengths, lengths])
    selected = loss_positions(mask) if loss_tokens else None
    segments = thd_segments(positions, lengths) if thd and microbatch.packed else None
    if segments is not None and max_seqlen is not None:
        segments = segments._replace(max_seqlen=max_seqlen)
    if pin:
        microbatch = microbatch.pin_memory()
        selected = None if selected is None else selected.pin_memory()
        segments = None if segments is None else segments.pin_memory()
    return StagedMicroBatch(microbatch, doubled, signs, selected, segments)


def paired_microbatches(
    microbatches: Iterable[MicroBatch], noise: NoiseConfig, device="cpu"
) -> Iterator[MicroBatch]:
    """The micro-batches a step runs, on ``device``: as given, or both symmetric copies of each.

    ``concat`` yields each micro-batch doubled; ``microbatch`` yields it twice, with the
    signs +1 then -1, so the number of micro-batches per step doubles instead.
    """
    for microbatch in microbatches:
        yield from stage(microbatch, noise).on_device(device)


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
