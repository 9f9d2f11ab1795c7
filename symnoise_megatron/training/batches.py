"""A step's micro-batches: samples of a global batch collated or packed into rows, cut to length."""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import List, Tuple

import torch

from symnoise_megatron.data.microbatch import MicroBatch, StagedMicroBatch, concatenate, stage
from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack_layout, packed_row
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import noise_scale
from symnoise_megatron.training.arguments import TrainingConfig


def trimmed_length(longest: int, full: int, multiple: int) -> int:
    """A step's row length: its longest real token rounded up to ``multiple``, never past the
    rows' full length (itself a multiple: ``check_seq_length``).

    Padding only ever follows real tokens, so cutting it changes no loss and no noise; it
    saves the compute that a fixed --seq-length spends on padding (short instruction data).
    All micro-batches of a step keep one length: pipeline stages exchange one shape.
    """
    return min(full, max(multiple, -(-longest // multiple) * multiple))


def sequence_shards(config: TrainingConfig) -> int:
    """How many ranks a row's positions are split over before the GEMMs: the tensor-parallel
    ranks under sequence parallelism, else none."""
    tp = config.parallelism.tensor_model_parallel_size
    return tp if config.parallelism.sequence_parallel and tp > 1 else 1


def required_length_multiple(config: TrainingConfig) -> Tuple[int, List[str]]:
    """What every row length of the run must be a multiple of, and why: sequence parallelism
    splits the sequence over the tensor-parallel ranks, and FP8 GEMMs take what each rank holds
    of it in multiples of 16 tokens (Transformer Engine's FP8 check); blockwise scaling gathers
    FP8 shards of whole 128-token blocks."""
    multiple, reasons = 1, []
    shards = sequence_shards(config)
    if shards > 1:
        multiple, reasons = shards, [f"--sequence-parallel splits it over --tensor-model-parallel-size {shards}"]
    if config.precision.fp8_format:
        tokens = 128 if shards > 1 and config.precision.fp8_recipe == "blockwise" else 16
        per_rank = f" on each of the {shards} sequence-parallel ranks" if shards > 1 else ""
        multiple = math.lcm(multiple, tokens * shards)
        reasons.append(f"--fp8-format's GEMMs take multiples of {tokens} tokens{per_rank}"
                       + (" (--fp8-recipe blockwise gathers 128-token blocks)" if tokens == 128 else ""))
    return multiple, reasons


def check_seq_length(config: TrainingConfig) -> int:
    """The multiple rows are cut to, decided at start-up: a --seq-length that a step could not
    run at is refused here, naming the flags, rather than when the data happens to fill a row.

    Beyond what is required, rows on a GPU are rounded to multiples of 16 tokens on each
    sequence-parallel rank (tensor-core tiles); a CPU wants no rounding (every added position
    costs compute)."""
    required, reasons = required_length_multiple(config)
    seq_length = config.data.seq_length
    if seq_length % required:
        raise ValueError(f"--seq-length {seq_length} must be a multiple of {required} ({'; '.join(reasons)}): "
                         f"use {seq_length // required * required or required} or {-(-seq_length // required) * required}")
    return math.lcm(required, 16 * sequence_shards(config) if torch.cuda.is_available() else 1)


@dataclass(frozen=True)
class RankInputs:
    """What this rank's model chunks read of a micro-batch, and how it goes to the device.

    Attributes:
        tokens: the embedding's inputs (a rank holding the first pipeline stage).
        targets: labels and loss mask (a rank holding the last stage, its output layer and loss).
            A middle stage reads neither: its rows carry positions, lengths and uids only, laid
            out from the samples' lengths in the index file, without reading a token.
        thd: packed rows go through Transformer Engine's thd attention (segments taken on the host).
        pin: page-locked host tensors for copies that do not block the host (CUDA).
    """

    tokens: bool = True
    targets: bool = True
    thd: bool = False
    pin: bool = False


@dataclass
class HostStep:
    """One step's micro-batches, built and staged on the host (ahead of the step, by a worker).

    Attributes:
        staged: the data micro-batches, each moved to the device when the schedule first asks.
        noise_totals: ``noise_scale_totals`` of the step's samples.
        positions: token positions the step runs (rows x length x copies), for the throughput.
    """

    staged: List[StagedMicroBatch]
    noise_totals: torch.Tensor
    positions: int

    @property
    def runs(self) -> int:
        """Micro-batches the schedule runs (both copies of each under ``microbatch`` pairing)."""
        return sum(s.runs for s in self.staged)


class StepBatches:
    """Builds the micro-batches of one step from the (uid, index) groups the sampler hands out.

    Rows are as long as the step's longest sample needs (``trimmed_length``), or exactly
    --seq-length with static shapes (``static_shapes``: the shapes of every tensor handed to the
    model are decided at start-up, as TP communication overlap and CUDA graphs need)."""

    def __init__(self, config: TrainingConfig, pad_id: int, hidden_size: int = 0):
        self.seq_length = config.data.seq_length
        self.pack_sequences = config.data.pack_sequences
        self.micro_batch_size = config.optimizer.micro_batch_size
        self.pipeline_stages = config.parallelism.pipeline_model_parallel_size
        self.interleaved = bool(config.parallelism.num_layers_per_virtual_pipeline_stage
                                or config.parallelism.num_virtual_stages_per_pipeline_rank)
        self.static_shapes = config.performance.uses_static_shapes
        self.pad_id = pad_id
        self.hidden_size = hidden_size
        self.rank = RankInputs()
        # Every trimmed length is a multiple of this, and so is --seq-length (checked here).
        self.length_multiple = check_seq_length(config)

    def __call__(self, groups, indices, data) -> List[MicroBatch]:
        """The step's micro-batches on the host, with what this rank reads (``self.rank``)."""
        samples = [[self._sample(uid, int(indices[i]), data) for uid, i in group] for group in groups]
        if not self.pack_sequences:
            longest = max(s.input_length(self.seq_length) for group in samples for s in group)
            length = self.row_length(longest)
            return [collate(group, self.seq_length, self.pad_id, length) for group in samples]
        flat = [s for group in samples for s in group]
        layout = pack_layout([s.input_length(self.seq_length) for s in flat], self.seq_length)
        length = self.row_length(max(sum(flat[i].input_length(self.seq_length) for i in members) for members in layout))
        rows = [packed_row([flat[i] for i in members], self.seq_length, self.pad_id, length) for members in layout]
        size = self.micro_batch_size
        if self.pipeline_stages > 1 or self.static_shapes:
            # Stages exchange activations of one fixed shape, static shapes hand every forward
            # one shape, and the interleaved schedule wants whole groups of micro-batches: fill
            # out with empty rows.
            multiple = size * (self.pipeline_stages if self.interleaved else 1)
            rows += [empty_packed_row(length, self.pad_id, self._reads_samples) for _ in range(-len(rows) % multiple)]
        return [concatenate(rows[i:i + size]) for i in range(0, len(rows), size)]

    @property
    def _reads_samples(self) -> bool:
        """Whether this rank reads the samples' tokens (else their lengths only)."""
        return self.rank.tokens or self.rank.targets

    def _sample(self, uid: int, index: int, data) -> Sample:
        if self._reads_samples:
            return Sample(uid, *data[index])
        return Sample(uid, None, None, data.sequence_length(index))

    def row_length(self, longest: int) -> int:
        return self.seq_length if self.static_shapes else trimmed_length(longest, self.seq_length, self.length_multiple)

    def staged(self, groups, indices, data, noise: NoiseConfig) -> HostStep:
        """The step built and staged for the device under ``noise``'s pairing, all on the host:
        what a background worker prepares while the device runs the step before."""
        microbatches = [self._read_here(mb) for mb in self(groups, indices, data)]
        # Static shapes: logits at every position (a fixed [b * s] buffer whose masked entries
        # add nothing), rather than at a count of loss tokens that changes every step.
        staged = [stage(mb, noise, loss_tokens=not self.static_shapes, thd=self.rank.thd,
                        max_seqlen=self.seq_length if self.static_shapes else None, pin=self.rank.pin)
                  for mb in microbatches]
        positions = sum(mb.position_ids.numel() for mb in microbatches) * noise.copies
        return HostStep(staged, noise_scale_totals(microbatches, noise, self.hidden_size), positions)

    def _read_here(self, microbatch: MicroBatch) -> MicroBatch:
        """Without the fields no model chunk of this rank reads (a stage's tokens or targets)."""
        dropped = ({} if self.rank.tokens else {"tokens": None}) | (
            {} if self.rank.targets else {"labels": None, "loss_mask": None})
        return dataclasses.replace(microbatch, **dropped) if dropped else microbatch


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
