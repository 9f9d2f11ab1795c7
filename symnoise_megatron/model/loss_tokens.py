"""Logits and cross entropy at the loss tokens only.

In instruction data most positions are prompt or padding, whose predictions the loss masks
out; on the bundled set three in four. The output layer ([tokens, hidden] x [hidden, vocab],
a fifth of a 135M model's FLOPs and the step's largest activations) and the cross entropy
over the vocabulary need only the positions that carry loss. ``GPTModelForSFT`` runs them
there and puts the per-token losses back at their positions, zero elsewhere, so megatron-core's
``[b, s]`` loss contract and everything downstream (the loss mask, the per-token scaling) are
unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from megatron.core.models.gpt import GPTModel


class GPTModelForSFT(GPTModel):
    """``GPTModel`` that, while :func:`loss_tokens_only` is active, computes logits at loss tokens only.

    Outside it (generation, logits for evaluation) the model is megatron-core's, unchanged.
    The output layer is called with the hidden states as its first positional argument, as
    ``GPTModel._postprocess`` does; the pre-hook replaces them by the selected rows [n, 1, h].
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_positions: Optional[torch.Tensor] = None  # flat indices into megatron's [s, b] token order
        # Under sequence parallelism the rows to keep lie on several ranks' sequence shards and the
        # output layer gathers them itself; megatron-core's path is kept there.
        self.selects_loss_tokens = self.post_process and not self.config.sequence_parallel
        if self.selects_loss_tokens:
            self.output_layer.register_forward_pre_hook(self._select_loss_positions)

    def _select_loss_positions(self, output_layer, args):
        if self.loss_positions is None:
            return None
        hidden, *rest = args
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.loss_positions)
        return (selected.unsqueeze(1), *rest)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.loss_positions is None:
            return super().compute_language_model_loss(labels, logits)
        batch, seq = labels.shape
        selected_labels = labels.t().reshape(-1).index_select(0, self.loss_positions)
        selected_loss = super().compute_language_model_loss(selected_labels[None, :], logits)
        loss = selected_loss.new_zeros(seq * batch).index_copy(0, self.loss_positions, selected_loss.reshape(-1))
        return loss.view(seq, batch).t()


@contextmanager
def loss_tokens_only(model: torch.nn.Module, positions: torch.Tensor) -> Iterator[None]:
    """Within this block, ``model``'s output layer and loss run at ``positions`` only
    (flat indices in megatron's [s, b] token order, as ``MicroBatch.positions_with_loss``)."""
    chunks = [m for m in model.modules() if isinstance(m, GPTModelForSFT) and m.selects_loss_tokens]
    for chunk in chunks:
        chunk.loss_positions = positions
    try:
        yield
    finally:
        for chunk in chunks:
            chunk.loss_positions = None
