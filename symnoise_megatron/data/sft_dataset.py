"""The training side of the data path: indexed files -> padded or packed micro-batches."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Sequence, Tuple

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
    uid: int
    tokens: np.ndarray  # the stored sequence: inputs are tokens[:-1], targets tokens[1:]
    loss_mask: np.ndarray


def _inputs(sample: Sample, seq_length: int):
    """Input tokens, targets, loss mask, each at most ``seq_length`` long."""
    tokens = torch.from_numpy(sample.tokens.astype(np.int64))[: seq_length + 1]
    mask = torch.from_numpy(sample.loss_mask.astype(np.float32))[: seq_length + 1]
    return tokens[:-1], tokens[1:], mask[1:]


def collate(samples: List[Sample], seq_length: int, pad_id: int = 0) -> MicroBatch:
    """One sample per row, padded to ``seq_length``; padding has no loss and no noise."""
    rows = len(samples)
    tokens = torch.full((rows, seq_length), pad_id, dtype=torch.int64)
    labels = torch.zeros((rows, seq_length), dtype=torch.int64)
    loss_mask = torch.zeros((rows, seq_length))
    lengths = torch.zeros(rows, dtype=torch.int64)
    for row, sample in enumerate(samples):
        inputs, targets, mask = _inputs(sample, seq_length)
        n = inputs.numel()
        tokens[row, :n], labels[row, :n], loss_mask[row, :n] = inputs, targets, mask
        lengths[row] = n
    # Padding continues the positions, so position >= length marks it for the noise.
    positions = torch.arange(seq_length).expand(rows, seq_length).clone()
    uids = torch.tensor([s.uid for s in samples], dtype=torch.int64)
    return MicroBatch(tokens, labels, loss_mask, positions, uids, lengths)


def pack(samples: List[Sample], seq_length: int, pad_id: int = 0) -> List[MicroBatch]:
    """Samples packed first-fit-decreasing into rows of ``seq_length``; one row per MicroBatch.

    Each sample keeps its own positions (restarting at 0), uid and length per token, targets
    never cross into the next sample, and attention never crosses either (the local spec's mask
    is block-diagonal causal, Transformer Engine's thd segments end at each sample).
    """
    pieces = [(sample, *_inputs(sample, seq_length)) for sample in samples]
    order = sorted(range(len(pieces)), key=lambda i: (-pieces[i][1].numel(), i))
    rows: List[List[int]] = []
    free: List[int] = []
    for index in order:
        n = pieces[index][1].numel()
        for row, space in enumerate(free):
            if n <= space:
                rows[row].append(index)
                free[row] -= n
                break
        else:
            rows.append([index])
            free.append(seq_length - n)
    out = []
    for members in rows:
        tokens = torch.full((seq_length,), pad_id, dtype=torch.int64)
        labels = torch.zeros(seq_length, dtype=torch.int64)
        loss_mask = torch.zeros(seq_length)
        positions = torch.zeros(seq_length, dtype=torch.int64)
        uids = torch.zeros(seq_length, dtype=torch.int64)
        lengths = torch.zeros(seq_length, dtype=torch.int64)
        cursor = 0
        for index in sorted(members):
            sample, inputs, targets, mask = pieces[index]
            n = inputs.numel()
            span = slice(cursor, cursor + n)
            tokens[span], labels[span], loss_mask[span] = inputs, targets, mask
            positions[span] = torch.arange(n)
            uids[span], lengths[span] = sample.uid, n
            cursor += n
        if cursor < seq_length:  # tail padding: the last sample's uid, positions past its end
            positions[cursor:] = torch.arange(cursor, seq_length) - (cursor - lengths[cursor - 1])
            uids[cursor:], lengths[cursor:] = uids[cursor - 1], lengths[cursor - 1]
        out.append(MicroBatch(tokens[None], labels[None], loss_mask[None], positions[None], uids[None], lengths[None]))
    return out


def empty_packed_row(seq_length: int, pad_id: int = 0) -> MicroBatch:
    """A packed row of padding only (length 0): no loss and no noise, for filling out the
    last micro-batch where the pipeline needs every micro-batch the same size."""
    positions = torch.arange(seq_length)[None]
    zeros = torch.zeros((1, seq_length), dtype=torch.int64)
    return MicroBatch(torch.full((1, seq_length), pad_id, dtype=torch.int64), zeros.clone(),
                      torch.zeros((1, seq_length)), positions, zeros.clone(), zeros.clone())
