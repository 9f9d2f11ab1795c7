"""A weighted blend of preprocessed prefixes: Megatron-LM's ``--data-path W1 PREFIX1 W2 PREFIX2``,
the blend's samples as one index space, and its sample order.

The order interleaves the prefixes as megatron-core's ``BlendedDataset`` does, with its own
helper (``helpers_cpp.build_blending_indices``): sample ``n`` of the run comes from the prefix
whose count lags its weight the most, so after any ``n`` samples each prefix has given its
weight times ``n`` within one sample. The ``k``-th sample drawn from a prefix is sample ``k`` of
that prefix's own epoch-by-epoch shuffle (``SampleOrder``), so a prefix is seen over as many
epochs as its weight needs. The whole order is a pure function of the consumed-sample count and
the seed: the same under every layout, and a resume needs only the count. The count stays each
sample's uid for the noise.

``BlendedDataset`` itself is not used: it wants megatron's ``MegatronDataset`` per prefix (GPT
documents cut into sequences, its own split and shuffle, an index cache on disk) and a fixed
size, where this fine-tune reads whole instruction samples with its own split and order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from symnoise_megatron.data.sampler import SampleOrder

BLEND_FORM = "W1 PREFIX1 W2 PREFIX2 ... (as Megatron-LM: --data-path 0.7 PREFIX_A 0.3 PREFIX_B), or one prefix"


@dataclass(frozen=True)
class BlendEntry:
    """One prefix of a blend and its weight as given (None: the list gave no weights)."""

    prefix: str
    weight: Optional[float] = None


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(values: Sequence[str], flag: str = "--data-path") -> List[BlendEntry]:
    """Megatron-LM's forms: one prefix; ``W1 PREFIX1 W2 PREFIX2 ...``; or several prefixes without
    weights (weighted by their sample counts, as Megatron-LM does). Anything else is a one-line error."""
    values = [str(value) for value in values]
    if not values:
        raise ValueError(f"{flag} is required")
    if len(values) == 1:
        return [BlendEntry(values[0])]
    if _number(values[0]) is None:  # prefixes only
        numbers = [value for value in values if _number(value) is not None]
        if numbers:
            raise ValueError(f"{flag} {' '.join(values)}: {numbers[0]!r} looks like a weight, but the list does not start "
                             f"with one; give {BLEND_FORM}")
        return [BlendEntry(value) for value in values]
    if len(values) % 2:
        raise ValueError(f"{flag} {' '.join(values)}: {len(values)} values, so a weight lacks its prefix; give {BLEND_FORM}")
    entries = []
    for weight_text, prefix in zip(values[::2], values[1::2]):
        weight = _number(weight_text)
        if weight is None:
            raise ValueError(f"{flag}: {weight_text!r} (before {prefix!r}) is not a weight; give {BLEND_FORM}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{flag}: the weight {weight_text} of {prefix} is not a positive number")
        entries.append(BlendEntry(prefix, weight))
    return entries


def blend_text(entries: Sequence[BlendEntry]) -> str:
    """The blend as its flag's values read: ``0.7 A 0.3 B``, or the prefixes alone."""
    return " ".join(f"{e.weight:g} {e.prefix}" if e.weight is not None else e.prefix for e in entries)


def normalized_weights(entries: Sequence[BlendEntry], sizes: Sequence[int]) -> List[float]:
    """The weights as fractions summing to 1; a list without weights is weighted by ``sizes``."""
    raw = [e.weight for e in entries] if entries[0].weight is not None else [float(n) for n in sizes]
    total = float(sum(raw))
    return [w / total for w in raw]


class ConcatenatedSamples:
    """Several prefixes' samples as one index space: prefix 0's samples, then prefix 1's, ..."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])

    @property
    def meta(self) -> dict:
        """The first prefix's meta (all of a blend share tokenizer and template, checked at load)."""
        return self.parts[0].meta

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - int(self.starts[part])]

    def sequence_length(self, index: int) -> int:
        """The stored length of sample ``index`` (from the index file: no token is read)."""
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part].sequence_length(index - int(self.starts[part]))


class BlendOrder:
    """The run's sample order over a blend; the interface of ``SampleOrder`` (``sample_at``,
    ``num_samples``, ``seed``).

    ``part_sizes[i]`` samples of part ``i`` (a prefix's train or validation part) sit at positions
    ``sum(part_sizes[:i]) + 0 .. part_sizes[i] - 1`` of the index array the positions address.
    """

    def __init__(self, part_sizes: Sequence[int], weights: Sequence[float], seed: int = 1234, shuffle: bool = True):
        if len(part_sizes) != len(weights) or not part_sizes:
            raise ValueError("a blend needs one weight per part")
        # Each part its own stream of epochs, so that two parts of one size are not shuffled alike.
        self.parts = [SampleOrder(n, seed, shuffle, stream=i) for i, n in enumerate(part_sizes)]
        self.part_starts = np.cumsum([0] + list(part_sizes[:-1]))
        self.weights = np.asarray(weights, dtype=np.float64)
        self.num_samples = int(sum(part_sizes))
        self.seed = seed
        self._which = np.zeros(0, dtype=np.int16)
        self._draw = np.zeros(0, dtype=np.int64)

    def _draws(self, count: int) -> Tuple[np.ndarray, np.ndarray]:
        """For the run's first ``count`` samples: the part of each and its rank among that part's draws.

        The greedy interleave does not depend on the total, so a longer table starts as the shorter."""
        if count > len(self._which):
            from megatron.core.datasets import helpers_cpp

            size = max(count, 2 * len(self._which), 1 << 16)
            which, draw = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
            helpers_cpp.build_blending_indices(which, draw, self.weights, len(self.parts), size, False)
            self._which, self._draw = which, draw
        return self._which[:count], self._draw[:count]

    def sample_at(self, consumed: int) -> int:
        """The position (in the concatenated parts) of the run's ``consumed``-th sample."""
        which, draw = self._draws(consumed + 1)
        part = int(which[consumed])
        return int(self.part_starts[part]) + self.parts[part].sample_at(int(draw[consumed]))

    def counts(self, total: int) -> np.ndarray:
        """How many of the run's first ``total`` samples each part gives."""
        which, _ = self._draws(total)
        return np.bincount(which, minlength=len(self.parts))
