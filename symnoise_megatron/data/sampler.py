"""A deterministic, resumable order of samples, split into global and micro-batches.

The whole order is a pure function of ``consumed`` (the global count of samples consumed so
far): sample ``consumed`` is ``permutation_e[consumed % n]`` with ``e = consumed // n`` the
epoch, each epoch's permutation drawn from ``(seed, e)``. Resuming needs only ``consumed``,
and ``consumed`` is also each sample's uid for the noise, so a sample seen again in a later
epoch gets new noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np


@dataclass
class SampleOrder:
    """Attributes:
        num_samples: samples in the (train) split.
        seed: shuffling seed; each epoch gets its own permutation.
        shuffle: off keeps the stored order in every epoch.
        stream: a blend's part number (None: the whole data is one part), so that each part of a
            blend is shuffled apart from the others.
    """

    num_samples: int
    seed: int = 1234
    shuffle: bool = True
    stream: Optional[int] = None
    _cache: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_samples <= 0:
            raise ValueError("the dataset split has no samples")

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            if self.shuffle:
                key = [self.seed, epoch] if self.stream is None else [self.seed, self.stream, epoch]
                rng = np.random.default_rng(key)
                self._cache[epoch] = rng.permutation(self.num_samples)
            else:
                self._cache[epoch] = np.arange(self.num_samples)
        return self._cache[epoch]

    def sample_at(self, consumed: int) -> int:
        """The dataset index of the ``consumed``-th sample of the run."""
        epoch, offset = divmod(consumed, self.num_samples)
        return int(self.permutation(epoch)[offset])


@dataclass
class GlobalBatchSampler:
    """This data-parallel rank's share of each global batch, as (uid, dataset index) pairs.

    Global batch ``[c, c + G)`` is split into ``dp`` contiguous shares; rank ``r`` takes
    share ``r``. Within a share, consecutive samples form micro-batches. ``order``: a
    ``SampleOrder``, or a ``BlendOrder`` over several prefixes (data/blend.py).
    """

    order: SampleOrder
    global_batch_size: int
    micro_batch_size: int
    data_parallel_rank: int = 0
    data_parallel_size: int = 1
    consumed_samples: int = 0
    # Off when the run was told to train on other data than its checkpoint's (--override-data-config).
    check_resumed_order: bool = True

    def __post_init__(self):
        per_rank, remainder = divmod(self.global_batch_size, self.data_parallel_size)
        if remainder or per_rank % self.micro_batch_size:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by micro-batch size "
                f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size}"
            )

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def batch_at(self, consumed: int) -> List[List[Tuple[int, int]]]:
        """Micro-batches of (uid, dataset index) for this rank of the global batch that starts after
        ``consumed`` samples. A pure function of ``consumed``: a batch built ahead of its step (by a
        background worker) is the batch the step would have built, and building it changes nothing."""
        share = self.global_batch_size // self.data_parallel_size
        start = consumed + self.data_parallel_rank * share
        pairs = [(uid, self.order.sample_at(uid)) for uid in range(start, start + share)]
        return [pairs[i:i + self.micro_batch_size] for i in range(0, share, self.micro_batch_size)]

    def advance(self) -> None:
        """The step took its global batch: what a checkpoint records as consumed moves past it."""
        self.consumed_samples += self.global_batch_size

    def next_global_batch(self) -> List[List[Tuple[int, int]]]:
        """Micro-batches of (uid, dataset index) for this rank; advances ``consumed_samples``."""
        batch = self.batch_at(self.consumed_samples)
        self.advance()
        return batch

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.order.seed,
                "num_samples": self.order.num_samples, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        if self.check_resumed_order and (state["num_samples"] != self.order.num_samples or state["seed"] != self.order.seed):
            raise ValueError(
                f"the checkpoint's data order ({state['num_samples']} samples, seed {state['seed']}) "
                f"does not match this run's ({self.order.num_samples} samples, seed {self.order.seed})"
            )
        self.consumed_samples = int(state["consumed_samples"])
