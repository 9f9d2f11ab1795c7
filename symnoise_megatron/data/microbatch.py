"""Micro-batches as the forward step consumes them, and the pairing of a symmetric step."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

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
        position_ids: position of each token within its own sample.
        attention_mask: [b, 1, s, s] boolean, True where attention is masked.
        sample_uids: [b], or [b, s] for packed rows: global consumed-sample index.
        lengths: [b], or [b, s] for packed rows: real length of each token's sample.
        sign: +1/-1, or a [b] tensor per row: the symmetric copy each row carries.
        loss_positions: flat indices of the loss tokens in megatron's [s, b] order, taken from
            ``loss_mask`` on the host by :meth:`to` so that the device never waits to count them;
            None until then.
    """

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    sample_uids: torch.Tensor
    lengths: torch.Tensor
    sign: Union[int, torch.Tensor] = 1
    loss_positions: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    def real_tokens(self) -> torch.Tensor:
        """[b, s] True on the tokens of samples, False on padding."""
        return self.position_ids < per_token(self.lengths, self.position_ids)

    def noise_batch(self) -> NoiseBatch:
        return NoiseBatch(self.sample_uids, self.position_ids, self.lengths, self.sign)

    def to(self, device) -> "MicroBatch":
        on_host = dataclasses.replace(self, loss_positions=self.positions_with_loss())
        return dataclasses.replace(
            on_host,
            **{
                f.name: getattr(on_host, f.name).to(device)
                for f in dataclasses.fields(on_host)
                if isinstance(getattr(on_host, f.name), torch.Tensor)
            },
        )

    def positions_with_loss(self) -> torch.Tensor:
        return self.loss_positions if self.loss_positions is not None else loss_positions(self.loss_mask)

    def truncated(self, length: int) -> "MicroBatch":
        """The first ``length`` positions of every row (the attention mask cut to match)."""
        cut = {name: getattr(self, name)[:, :length] for name in ("tokens", "labels", "loss_mask", "position_ids")}
        for name in ("sample_uids", "lengths"):
            value = getattr(self, name)
            if value.dim() == 2:
                cut[name] = value[:, :length]
        return dataclasses.replace(self, attention_mask=self.attention_mask[:, :, :length, :length],
                                   loss_positions=None, **cut)

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
        if f.name not in ("sign", "loss_positions")
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
