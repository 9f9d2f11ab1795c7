"""The data iterators handed to megatron-core's pipeline schedule: each micro-batch moves to the
device just before its first forward, not the whole step's before the schedule starts.

A staged micro-batch (``data.microbatch.StagedMicroBatch``) moves once, page-locked and without
blocking the host where there is CUDA; the micro-batches the schedule runs from it (both symmetric
copies) share that copy. With interleaved pipeline stages each model chunk of this rank reads the
same micro-batches in turn: the device copy lives from the first chunk's forward of it to the last
chunk's, then only the activations that chunks keep for their backward hold on to its tensors.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from symnoise_megatron.data.microbatch import MicroBatch, StagedMicroBatch


class DeviceFeed:
    """The step's micro-batches for ``chunks`` model chunks, moved to ``device`` on first use."""

    def __init__(self, staged: List[StagedMicroBatch], device, chunks: int = 1):
        self.staged, self.device, self.chunks = staged, device, chunks
        self.order = [(i, j) for i, item in enumerate(staged) for j in range(item.runs)]
        self._moved: Dict[int, List[MicroBatch]] = {}
        self._taken = [0] * len(staged)
        self.moves = 0  # copies to the device so far (one per staged micro-batch)

    def __len__(self) -> int:
        """Micro-batches the schedule runs."""
        return len(self.order)

    def iterators(self):
        """What the schedule takes as ``data_iterator``: one iterator, or one per model chunk."""
        iterators = [self.iterator() for _ in range(self.chunks)]
        return iterators if self.chunks > 1 else iterators[0]

    def iterator(self) -> Iterator[MicroBatch]:
        for index, run in self.order:
            yield self._take(index, run)

    def _take(self, index: int, run: int) -> MicroBatch:
        runs = self._moved.get(index)
        if runs is None:
            runs = self._moved[index] = self.staged[index].on_device(self.device, non_blocking=True)
            self.moves += 1
        self._taken[index] += 1
        if self._taken[index] == self.chunks * len(runs):
            del self._moved[index]  # every chunk has it: the feed keeps no device copy past its use
        return runs[run]

    @property
    def resident(self) -> int:
        """Staged micro-batches the feed holds on the device now."""
        return len(self._moved)
