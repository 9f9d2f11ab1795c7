"""What one forward of the model reads besides its arguments: the micro-batch's noise batch
(for the noisy embedding) and its loss positions (for the output layer and the loss).

megatron-core's schedules call the model with tokens, positions, mask and labels only, so the
forward step hands the rest over for the length of one forward and takes it back after: the
schedule calls the loss function only after the forward step has returned, and activation
recomputation reruns transformer layers alone (neither the embedding nor the output layer), so
nothing reads either once the forward is done. Cleared, a stale batch can never noise another
micro-batch's forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from symnoise_megatron.model.loss_tokens import GPTModelForSFT
from symnoise_megatron.noise.embedding import NoiseBatch, set_noise_batch


@contextmanager
def step_inputs(
    model: torch.nn.Module, noise_batch: Optional[NoiseBatch] = None, loss_positions: Optional[torch.Tensor] = None,
) -> Iterator[None]:
    """Within this block ``model``'s noisy embedding noises with ``noise_batch`` and its output
    layer and loss run at ``loss_positions`` only (flat indices in megatron's [s, b] token order,
    as ``MicroBatch.positions_with_loss``; None: every position). Both are cleared at exit."""
    chunks = [m for m in model.modules() if isinstance(m, GPTModelForSFT) and m.selects_loss_tokens]
    set_noise_batch(model, noise_batch)
    for chunk in chunks:
        chunk.loss_positions = loss_positions
    try:
        yield
    finally:
        set_noise_batch(model, None)
        for chunk in chunks:
            chunk.loss_positions = None
