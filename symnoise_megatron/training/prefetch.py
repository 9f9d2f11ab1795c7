"""A step's host work off the critical path: the next step's micro-batches built in a background
thread while the device runs this one.

A step's batches are a pure function of the sampler position they start at (the samples, their
order and their noise are functions of (seed, uid, position)), so a batch built ahead is the batch
that would have been built in its turn: building ahead changes no number. Nothing here advances
the sampler; the trainer does, when a step takes its batch, so a checkpoint never counts a batch
that was built but not trained on, and one dropped at a stop costs only the work.

A thread rather than a process: the work is reading memory-mapped samples and filling torch
tensors (which release the GIL), pinned memory must be allocated by this process anyway, and
the main thread spends a GPU step waiting on the device and on collectives.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Optional, Tuple, TypeVar

import torch

T = TypeVar("T")


class Prefetcher(Generic[T]):
    """``build(key)`` results, the next one built in the background while the caller works.

    One build at a time (the builder's caches, such as the sample order's, are not shared between
    threads): a request for a key other than the one being built waits for that build first."""

    def __init__(self, build: Callable[[int], T], name: str = "batches", device=None):
        self.build = build
        # A CUDA device: the thread's pinned allocations are made on this rank's GPU, as torch's
        # DataLoader does in its pin-memory thread (a new thread's current device is GPU 0, where
        # every rank of a node would otherwise open a context).
        cuda = device is not None and torch.device(device).type == "cuda"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"symnoise-{name}",
                                           initializer=(lambda: torch.cuda.set_device(device)) if cuda else None)
        self.pending: Optional[Tuple[int, Future]] = None

    def get(self, key: int, next_key: Optional[int] = None) -> T:
        """``build(key)``, from the background if it was started there; then starts ``next_key``'s
        build (None: nothing more will be asked for). A builder's error is raised here."""
        result = None
        if self.pending is not None:
            pending_key, future = self.pending
            self.pending = None
            if pending_key == key:
                result = future.result()
            else:
                future.cancel()
                _wait_quietly(future)
        if result is None:
            result = self.build(key)
        if next_key is not None:
            self.pending = (next_key, self.executor.submit(self.build, next_key))
        return result

    def settle(self) -> None:
        """Wait for the build in flight, keeping its result for the ``get`` that asks for it."""
        if self.pending is not None:
            _wait_quietly(self.pending[1])

    def close(self) -> None:
        """Drop the build in flight (its batch was never taken) and end the thread."""
        if self.pending is not None:
            self.pending[1].cancel()
            self.pending = None
        self.executor.shutdown(wait=True, cancel_futures=True)


def _wait_quietly(future: Future) -> None:
    """A build nobody will read: let it finish (one build at a time) and drop its result or error."""
    try:
        future.result()
    except BaseException:  # noqa: BLE001 - its key was not asked for; the requested build reports its own errors
        pass
