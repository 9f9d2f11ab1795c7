"""The training side of the data path: indexed files -> padded or packed micro-batches."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from symnoise_megatron.data.microbatch import MicroBatch
from symnoise_megatron.data.preprocess import output_paths


class SFTIndexedData:
    """The tokens and loss-mask indexed datasets of one output prefix, checked for completeness."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        paths = output_paths(prefix)
        for key in ("tokens", "loss_mask"):
            for suffix in (".bin", ".idx"):
                if not os.path.exists(paths[key] + suffix):
                    raise FileNotFoundError(f"--data-path {prefix}: {paths[key] + suffix} does not exist")
        if not os.path.exists(paths["meta"]):
            raise FileNotFoundError(
                f"--data-path {prefix}: {paths['meta']} is missing, so the preprocessing did not finish; run it again"
            )
        with open(paths["meta"], encoding="utf-8") as handle:
            self.meta = json.load(handle)
        self._check_file_sizes(prefix, paths)  # first: a .bin truncated to nothing is damage, not emptiness
        if self.meta.get("samples") == 0 or os.path.getsize(paths["tokens"] + ".bin") == 0:
            raise ValueError(
                f"--data-path {prefix}: the dataset is empty (0 samples); its preprocessing kept nothing, see "
                f"'dropped' and 'skipped_rows' in {paths['meta']}"
            )
        self.tokens = IndexedDataset(paths["tokens"])
        self.loss_mask = IndexedDataset(paths["loss_mask"])
        if not (len(self.tokens) == len(self.loss_mask) == self.meta["samples"]):
            raise ValueError(
                f"--data-path {prefix}: {len(self.tokens)} token sequences, {len(self.loss_mask)} loss masks and "
                f"{self.meta['samples']} samples in the meta file do not agree"
            )
        for key in ("tokens", "loss_mask"):
            self._check_index_covers_bin(paths[key], getattr(self, key))
        lengths, mask_lengths = self.tokens.sequence_lengths, self.loss_mask.sequence_lengths
        if not np.array_equal(lengths, mask_lengths):
            first = int(np.flatnonzero(lengths != mask_lengths)[0])
            raise ValueError(
                f"--data-path {prefix}: sample {first} has {lengths[first]} tokens in {paths['tokens']}.idx but "
                f"{mask_lengths[first]} loss-mask entries in {paths['loss_mask']}.idx; the two files are not one dataset"
            )

    def _check_file_sizes(self, prefix, paths):
        """The sizes the preprocessing recorded: an .idx or .bin copied from another run differs."""
        recorded = self.meta.get("file_bytes") or {}
        for key in ("tokens", "loss_mask"):
            for suffix in (".bin", ".idx"):
                path = paths[key] + suffix
                expected = recorded.get(os.path.basename(path))
                if expected is not None and os.path.getsize(path) != expected:
                    raise ValueError(
                        f"--data-path {prefix}: {path} has {os.path.getsize(path)} bytes but {paths['meta']} "
                        f"recorded {expected}; it is not the file this preprocessing wrote (run it again)"
                    )

    @staticmethod
    def _check_index_covers_bin(path, dataset):
        """The .idx must describe the .bin exactly, or samples are read at wrong offsets."""
        index = dataset.index
        indexed_bytes = int(index.sequence_lengths.astype(np.int64).sum()) * index.dtype_size
        actual = os.path.getsize(path + ".bin")
        if indexed_bytes != actual:
            raise ValueError(
                f"{path}.idx describes {indexed_bytes // index.dtype_size} tokens ({indexed_bytes} bytes of "
                f"{np.dtype(index.dtype).name}) but {path}.bin holds {actual} bytes; the index belongs to another dataset"
            )
        ends = index.sequence_pointers.astype(np.int64) + index.sequence_lengths.astype(np.int64) * index.dtype_size
        if len(ends) and (ends.max() > actual or (index.sequence_pointers[1:] != ends[:-1]).any()):
            raise ValueError(f"{path}.idx: its sample offsets do not tile {path}.bin; the index belongs to another dataset")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        # Copies: megatron's arrays are views of a memory map that closes with the dataset.
        return np.array(self.tokens[index]), np.array(self.loss_mask[index])

    def sequence_length(self, index: int) -> int:
        """The stored length of sample ``index``, from the index file (no token is read)."""
        return int(self.tokens.sequence_lengths[index])


SPLIT_PARTS = ("train", "validation", "test")


def split_indices(num_samples: int, split: Sequence[float], seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test dataset indices: a seeded shuffle cut by the ``--split`` weights.

    Megatron's meaning: train,valid,test weights, a missing one 0. The test part is set aside,
    neither trained nor validated on (dropping its weight would train on it)."""
    if not 1 <= len(split) <= len(SPLIT_PARTS):
        raise ValueError(f"--split takes one to three weights (train,valid,test), got {list(split)}")
    weights = np.zeros(len(SPLIT_PARTS))
    weights[:len(split)] = split
    if weights.sum() <= 0 or (weights < 0).any():
        raise ValueError(f"--split weights must be non-negative with a positive sum, got {list(split)}")
    order = np.random.default_rng([seed, 0x5917]).permutation(num_samples)
    # Cumulative cuts: the parts always add up to num_samples, and two weights cut as before.
    cuts = np.rint(num_samples * np.cumsum(weights) / weights.sum()).astype(np.int64)
    cuts[-1] = num_samples
    bounds = [0, *cuts.tolist()]
    return tuple(np.sort(order[bounds[i]:bounds[i + 1]]) for i in range(len(SPLIT_PARTS)))


@dataclass
class Sample:
    """One stored sample. A rank that reads no tokens (a middle pipeline stage) knows only its
    uid and ``stored_length``, from the index file: its rows carry positions, lengths and uids."""

    uid: int
    tokens: Optional[np.ndarray]  # the stored sequence: inputs are tokens[:-1], targets tokens[1:]
    loss_mask: Optional[np.ndarray]
    stored_length: Optional[int] = None  # len(tokens); given where tokens is None

    def input_length(self, seq_length: int) -> int:
        """Input tokens this sample puts in a row: its stored sequence less the last token, cut
        to ``seq_length``."""
        stored = len(self.tokens) if self.tokens is not None else self.stored_length
        return max(0, min(stored - 1, seq_length))


def _inputs(sample: Sample, seq_length: int):
    """Input tokens, targets, loss mask, each at most ``seq_length`` long."""
    tokens = torch.from_numpy(sample.tokens.astype(np.int64))[: seq_length + 1]
    mask = torch.from_numpy(sample.loss_mask.astype(np.float32))[: seq_length + 1]
    return tokens[:-1], tokens[1:], mask[1:]


def _reads_tokens(samples: Sequence[Sample]) -> bool:
    return bool(samples) and samples[0].tokens is not None


def collate(samples: List[Sample], seq_length: int, pad_id: int = 0, row_length: Optional[int] = None) -> MicroBatch:
    """One sample per row, padded to ``row_length`` (default ``seq_length``, at least each
    sample's length); padding has no loss and no noise. Samples without tokens give rows of
    positions, lengths and uids only."""
    rows, row_length = len(samples), row_length or seq_length
    lengths = torch.tensor([sample.input_length(seq_length) for sample in samples], dtype=torch.int64)
    # Padding continues the positions, so position >= length marks it for the noise.
    positions = torch.arange(row_length).expand(rows, row_length).clone()
    uids = torch.tensor([s.uid for s in samples], dtype=torch.int64)
    if not _reads_tokens(samples):
        return MicroBatch(None, None, None, positions, uids, lengths)
    tokens = torch.full((rows, row_length), pad_id, dtype=torch.int64)
    labels = torch.zeros((rows, row_length), dtype=torch.int64)
    loss_mask = torch.zeros((rows, row_length))
    for row, sample in enumerate(samples):
        inputs, targets, mask = _inputs(sample, seq_length)
        n = inputs.numel()
        tokens[row, :n], labels[row, :n], loss_mask[row, :n] = inputs, targets, mask
    return MicroBatch(tokens, labels, loss_mask, positions, uids, lengths)


def pack_layout(lengths: Sequence[int], seq_length: int) -> List[List[int]]:
    """Which samples share a row: first-fit-decreasing by length (ties in order), rows of
    ``seq_length``. Lengths only, so every pipeline stage lays out the same rows, whether it
    reads the tokens or not."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[int] = []
    for index in order:
        n = lengths[index]
        for row, space in enumerate(free):
            if n <= space:
                rows[row].append(index)
                free[row] -= n
                break
        else:
            rows.append([index])
            free.append(seq_length - n)
    return [sorted(members) for members in rows]


def packed_row(samples: Sequence[Sample], seq_length: int, pad_id: int = 0,
               row_length: Optional[int] = None) -> MicroBatch:
    """One row of ``samples`` end to end, then padding up to ``row_length`` (default
    ``seq_length``; at least the samples' lengths). Each sample keeps its own positions (restarting
    at 0), uid and length per token; the padding carries the last sample's uid and length with
    positions past its end. No samples: an empty row (length 0, no loss, no noise)."""
    row_length = row_length or seq_length
    reads = _reads_tokens(samples) or not samples
    positions = torch.zeros(row_length, dtype=torch.int64)
    uids = torch.zeros(row_length, dtype=torch.int64)
    lengths = torch.zeros(row_length, dtype=torch.int64)
    if reads:
        tokens = torch.full((row_length,), pad_id, dtype=torch.int64)
        labels = torch.zeros(row_length, dtype=torch.int64)
        loss_mask = torch.zeros(row_length)
    cursor = 0
    for sample in samples:
        n = sample.input_length(seq_length)
        span = slice(cursor, cursor + n)
        if reads:
            inputs, targets, mask = _inputs(sample, seq_length)
            tokens[span], labels[span], loss_mask[span] = inputs, targets, mask
        positions[span] = torch.arange(n)
        uids[span], lengths[span] = sample.uid, n
        cursor += n
    if not samples:
        positions = torch.arange(row_length)
    elif cursor < row_length:  # tail padding: the last sample's uid, positions past its end
        positions[cursor:] = torch.arange(cursor, row_length) - (cursor - lengths[cursor - 1])
        uids[cursor:], lengths[cursor:] = uids[cursor - 1], lengths[cursor - 1]
    if not reads:
        return MicroBatch(None, None, None, positions[None], uids[None], lengths[None])
    return MicroBatch(tokens[None], labels[None], loss_mask[None], positions[None], uids[None], lengths[None])


def pack(samples: List[Sample], seq_length: int, pad_id: int = 0) -> List[MicroBatch]:
    """Samples packed first-fit-decreasing into rows of ``seq_length``; one row per MicroBatch.

    Targets never cross into the next sample, and attention never crosses either (the local
    spec's mask is block-diagonal causal, Transformer Engine's thd segments end at each sample).
    """
    layout = pack_layout([sample.input_length(seq_length) for sample in samples], seq_length)
    return [packed_row([samples[i] for i in members], seq_length, pad_id) for members in layout]


def empty_packed_row(seq_length: int, pad_id: int = 0, reads_tokens: bool = True) -> MicroBatch:
    """A packed row of padding only (length 0): no loss and no noise, for filling out the
    last micro-batch where the pipeline needs every micro-batch the same size."""
    row = packed_row([], seq_length, pad_id)
    return row if reads_tokens else dataclasses.replace(row, tokens=None, labels=None, loss_mask=None)
