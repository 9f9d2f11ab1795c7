"""A step's micro-batches: samples of a global batch collated or packed into rows, cut to length."""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import noise_scale
from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.data.microbatch import MicroBatch, concatenate


def trimmed_to_longest(microbatches: List[MicroBatch], multiple: int) -> List[MicroBatch]:
    """The step's micro-batches cut to its longest real token, rounded up to ``multiple`` (and
    never past the rows' full length, itself a multiple: ``check_seq_length``).

    Padding only ever follows real tokens, so cutting it changes no loss and no noise; it
    saves the compute that a fixed --seq-length spends on padding (short instruction data).
    All micro-batches of a step keep one length: pipeline stages exchange one shape.
    """
    longest = max(int((mb.real_tokens() * torch.arange(1, mb.tokens.shape[1] + 1)).max()) for mb in microbatches)
    full = microbatches[0].tokens.shape[1]
    length = min(full, max(multiple, -(-longest // multiple) * multiple))
    return [mb.truncated(length) for mb in microbatches] if length < full else microbatches


def required_length_multiple(config: TrainingConfig) -> Tuple[int, List[str]]:
    """What every row length of the run must be a multiple of, and why: sequence parallelism
    splits the sequence over the tensor-parallel ranks, FP8 GEMMs take multiples of 16 tokens."""
    multiple, reasons = 1, []
    tp = config.parallelism.tensor_model_parallel_size
    if config.parallelism.sequence_parallel and tp > 1:
        multiple, reasons = math.lcm(multiple, tp), reasons + [f"--sequence-parallel splits it over "
                                                               f"--tensor-model-parallel-size {tp}"]
    if config.precision.fp8_format:
        multiple, reasons = math.lcm(multiple, 16), reasons + ["--fp8-format's GEMMs take multiples of 16 tokens"]
    return multiple, reasons


def check_seq_length(config: TrainingConfig) -> int:
    """The multiple rows are cut to, decided at start-up: a --seq-length that a step could not
    run at is refused here, naming the flags, rather than when the data happens to fill a row.

    Beyond what is required, rows on a GPU are rounded to multiples of 16 (tensor-core tiles);
    a CPU wants no rounding (every added position costs compute)."""
    required, reasons = required_length_multiple(config)
    seq_length = config.data.seq_length
    if seq_length % required:
        raise ValueError(f"--seq-length {seq_length} must be a multiple of {required} ({'; '.join(reasons)}): "
                         f"use {seq_length // required * required or required} or {-(-seq_length // required) * required}")
    return math.lcm(required, 16 if torch.cuda.is_available() else 1)


class StepBatches:
    """Builds the micro-batches of one step from the (uid, index) groups the sampler hands out."""

    def __init__(self, config: TrainingConfig, pad_id: int):
        self.seq_length = config.data.seq_length
        self.pack_sequences = config.data.pack_sequences
        self.micro_batch_size = config.optimizer.micro_batch_size
        self.pipeline_stages = config.parallelism.pipeline_model_parallel_size
        self.interleaved = bool(config.parallelism.num_layers_per_virtual_pipeline_stage)
        self.pad_id = pad_id
        # Every trimmed length is a multiple of this, and so is --seq-length (checked here).
        self.length_multiple = check_seq_length(config)

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
