"""``NoisyVocabParallelEmbedding``: megatron-core's vocabulary-parallel embedding plus noise."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional, Union

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding

from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import embedding_noise
from symnoise_megatron.noise.fused import add_noise_fused, fused_noise_usable


@dataclass
class NoiseBatch:
    """What the embedding needs to know about one micro-batch to noise it.

    Attributes:
        sample_uids: [b] global consumed-sample index of each row, or [b, s] per token
            for packed rows.
        positions: [b, s] position of each token in its sample, as this rank holds the
            tokens (under context parallelism, the global positions of its slice).
        lengths: [b] or [b, s] real length of each token's sample.
        sign: +1 / -1 for the whole micro-batch (``microbatch`` pairing), or a [b] tensor
            per row (``concat`` pairing's doubled micro-batch).

    The tokens may reach the embedding as these rows laid end to end, ``[1, b * s]`` (packed
    rows on Transformer Engine's thd path); the batch keeps its ``[b, s]`` rows either way.
    """

    sample_uids: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    sign: Union[int, torch.Tensor] = 1


class NoisyVocabParallelEmbedding(VocabParallelEmbedding):
    """Adds the configured embedding noise after the tensor-parallel reduce.

    The noise is added in training mode only, to real tokens only, after the all-reduce (or
    the reduce-scatter under sequence parallelism, where each rank adds only the sequence
    slice it holds), so every rank of a tensor-parallel group holds the same noised
    activations before the first transformer layer and any pipeline boundary.

    The forward step hands each micro-batch's :class:`NoiseBatch` through
    :func:`set_noise_batch` for the length of one forward (``model.step_inputs``).
    """

    def __init__(self, *args, noise_config: NoiseConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise_config = noise_config
        self.noise_batch: Optional[NoiseBatch] = None
        # The Triton kernel where it can run (CUDA); the torch reference otherwise.
        self.use_fused_noise: bool = True

    @classmethod
    def replacing(cls, embedding: VocabParallelEmbedding, noise_config: NoiseConfig, config):
        """A noisy embedding that takes over ``embedding``'s weight Parameter itself.

        Keeping the same Parameter object keeps the attributes megatron-core set on it
        (tied output layer, embedding-group all-reduce, tensor-parallel metadata).
        """
        noisy = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            init_method=lambda weight: None,
            reduce_scatter_embeddings=embedding.reduce_scatter_embeddings,
            config=dataclasses.replace(config, perform_initialization=False, use_cpu_initialization=True),
            tp_group=embedding.tp_group,
            noise_config=noise_config,
        )
        noisy.weight = embedding.weight
        noisy.deterministic_mode = embedding.deterministic_mode
        return noisy

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        output = super().forward(input_)
        if not self.training or not self.noise_config.enabled:
            return output
        batch = self.noise_batch
        if batch is None:
            raise RuntimeError(
                "NoisyVocabParallelEmbedding in training mode got no NoiseBatch: call "
                "set_noise_batch(model, batch) in the forward step before the model"
            )
        # Packed rows on Transformer Engine's thd path come laid end to end ([1, b * s]) while
        # the batch keeps its rows ([b, s]): the same tokens in the same (row-major) order.
        end_to_end = batch.positions.shape != input_.shape
        if end_to_end and not (input_.dim() == 2 and input_.shape[0] == 1 and input_.numel() == batch.positions.numel()):
            raise ValueError(
                f"NoiseBatch positions {tuple(batch.positions.shape)} do not match the "
                f"input tokens {tuple(input_.shape)}"
            )
        rows_first, positions, uids, lengths, sign = self._noised_view(output, batch, end_to_end)
        if self.use_fused_noise and fused_noise_usable(rows_first):
            noised = add_noise_fused(rows_first, self.noise_config, uids, positions, lengths, sign, self.embedding_dim)
        else:
            noise = embedding_noise(
                self.noise_config, uids, positions, lengths, self.embedding_dim,
                sign=sign, dtype=output.dtype,
            )
            noised = rows_first + noise.to(output.device)
        if end_to_end:
            return noised.reshape(output.shape)
        return noised.transpose(0, 1) if self.reduce_scatter_embeddings else noised

    def _noised_view(self, output: torch.Tensor, batch: NoiseBatch, end_to_end: bool):
        """The output as [rows, tokens, h] with the batch fields of exactly those tokens."""
        positions, uids, lengths, sign = batch.positions, batch.sample_uids, batch.lengths, batch.sign
        rows, seq = positions.shape
        if not self.reduce_scatter_embeddings:
            return (output.view(rows, seq, -1) if end_to_end else output), positions, uids, lengths, sign
        # Under sequence parallelism the output is this rank's slice of the sequence: [s/tp, b, h],
        # or of the rows laid end to end, [b * s / tp, 1, h].
        local = output.shape[0]
        start = self.tp_group.rank() * local
        if not end_to_end:
            window = (slice(None), slice(start, start + local))
            rows_first = output.transpose(0, 1)
        elif local % seq == 0:  # whole rows
            window = (slice(start // seq, (start + local) // seq), slice(None))
            rows_first = output.view(local // seq, seq, -1)
            sign = sign[window[0]] if isinstance(sign, torch.Tensor) else sign
        elif seq % local == 0:  # part of one row
            row = start // seq
            window = (slice(row, row + 1), slice(start % seq, start % seq + local))
            rows_first = output.view(1, local, -1)
            sign = sign[window[0]] if isinstance(sign, torch.Tensor) else sign
        else:
            raise ValueError(f"a sequence-parallel slice of {local} tokens neither holds whole rows of {seq} "
                             "nor lies within one: choose the micro-batch size or tensor-parallel size so that it does")
        pick = lambda value: value[window] if value.dim() == 2 else value[window[0]]  # noqa: E731
        return rows_first, pick(positions), pick(uids), pick(lengths), sign


def noisy_embeddings(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]):
    """The :class:`NoisyVocabParallelEmbedding` modules of a model (chunk list or wrapper)."""
    modules = [model] if isinstance(model, torch.nn.Module) else list(model)
    return [m for chunk in modules for m in chunk.modules() if isinstance(m, NoisyVocabParallelEmbedding)]


def set_noise_batch(model, batch: Optional[NoiseBatch]) -> None:
    """Hand ``batch`` to the noisy embedding(s) of ``model`` for the next forward."""
    for embedding in noisy_embeddings(model):
        embedding.noise_batch = batch
