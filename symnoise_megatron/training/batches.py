"""A step's micro-batches: samples of a global batch collated or packed into rows, cut to length."""

from __future__ import annotations

from typing import List

import torch

from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import noise_scale
from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.data.microbatch import MicroBatch, concatenate


def trimmed_to_longest(microbatches: List[MicroBatch], multiple: int) -> List[MicroBatch]:
    """The step's micro-batches cut to its longest real token, rounded up to ``multiple``.

    Padding only ever follows real tokens, so cutting it changes no loss and no noise; it
    saves the compute that a fixed --seq-length spends on padding (short instruction data).
    All micro-batches of a step keep one length: pipeline stages exchange one shape.
    """
    longest = max(int((mb.real_tokens() * torch.arange(1, mb.tokens.shape[1] + 1)).max()) for mb in microbatches)
    full = microbatches[0].tokens.shape[1]
    length = min(full, max(multiple, -(-longest // multiple) * multiple))
    return [mb.truncated(length) for mb in microbatches] if length < full else microbatches


class StepBatches:
    """Builds the micro-batches of one step from the (uid, index) groups the sampler hands out."""

    def __init__(self, config: TrainingConfig, pad_id: int):
        self.seq_length = config.data.seq_length
        self.pack_sequences = config.data.pack_sequences
        self.micro_batch_size = config.optimizer.micro_batch_size
        self.pipeline_stages = config.parallelism.pipeline_model_parallel_size
        self.interleaved = bool(config.parallelism.num_layers_per_virtual_pipeline_stage)
        self.pad_id = pad_id
        # Sequence parallelism splits the sequence over TP ranks; GPU GEMMs (FP8 above all) want
        # multiples of 16. A CPU needs neither, and every rounded-up position costs compute.
        self.length_multiple = (16 if torch.cuda.is_available() else 1) * config.parallelism.tensor_model_parallel_size

    def __call__(self, groups, indices, data) -> List[MicroBatch]:
        return trimmed_to_longest(self.full_length(groups, indices, data), self.length_multiple)

    def full_length(self, groups, indices, data) -> List[MicroBatch]:
        samples = [[Sample(uid, *data[int(indices[i])]) for uid, i in group] for group in groups]
        if not self.pack_sequences:
            return [collate(group, self.seq_length, self.pad_id) for group in samples]
        rows = pack([s for group in samples for s in group], self.seq_length, self.pad_id)
        size = self.micro_batch_size
        if self.pipeline_stages > 1:
            # Stages exchange activations of one fixed shape, and the interleaved schedule
            # wants whole groups of micro-batches: fill out with empty rows.
            multiple = size * (self.pipeline_stages if self.interleaved else 1)
            rows += [empty_packed_row(self.seq_length, self.pad_id) for _ in range(-len(rows) % multiple)]
        return [concatenate(rows[i:i + size]) for i in range(0, len(rows), size)]


def noise_scale_totals(microbatches: List[MicroBatch], noise: NoiseConfig, hidden_size: int) -> torch.Tensor:
    """[sum of alpha / sqrt(L * d), number of samples] over the distinct samples of a step's
    micro-batches (float64): summed over data-parallel ranks, the step's mean noise scale, the
    same under every layout (one rank's last micro-batch is not)."""
    if not noise.enabled:
        return torch.zeros(2, dtype=torch.float64)
    # A packed sample's length stands at each of its positions: take it at its first (position 0).
    lengths = torch.cat([mb.lengths[mb.position_ids == 0] if mb.lengths.dim() == 2 else mb.lengths
                         for mb in microbatches])
    lengths = lengths[lengths > 0]
    scales = noise_scale(noise.alpha, lengths, hidden_size).to(torch.float64)
    return torch.tensor([float(scales.sum()), float(lengths.numel())], dtype=torch.float64)
