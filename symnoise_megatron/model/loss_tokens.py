"""Logits and cross entropy at the loss tokens only.

In instruction data most positions are prompt or padding, whose predictions the loss masks
out; on the bundled set three in four. The output layer ([tokens, hidden] x [hidden, vocab],
a fifth of a 135M model's FLOPs and the step's largest activations) and the cross entropy
over the vocabulary need only the positions that carry loss. ``GPTModelForSFT`` runs them
there and puts the per-token losses back at their positions, zero elsewhere, so megatron-core's
``[b, s]`` loss contract and everything downstream (the loss mask, the per-token scaling) are
unchanged.

Megatron pads the vocabulary to a multiple of ``make_vocab_size_divisible_by * TP``; the padded
columns of the logits are no tokens and must not take part in the softmax, or the loss would
depend on the tensor-parallel size. ``GPTModelForSFT`` gives them the lowest finite logit.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel


def valid_vocab_columns(vocab_size: int, columns: int, first_column: int) -> int:
    """How many of the ``columns`` logits starting at global column ``first_column`` are real tokens."""
    return min(max(vocab_size - first_column, 0), columns)


class GPTModelForSFT(GPTModel):
    """``GPTModel`` that, given ``loss_positions`` (by :func:`symnoise_megatron.model.step_inputs.step_inputs`),
    computes logits at loss tokens only.

    Outside it (generation, logits for evaluation) the output layer runs at every position.
    The output layer is called with the hidden states as its first positional argument, as
    ``GPTModel._postprocess`` does; the pre-hook replaces them by the selected rows [n, 1, h].

    ``unpadded_vocab_size`` is the tokenizer's vocabulary (``vocab_size`` is megatron's padded
    one): the output layer's columns beyond it are masked in every path (the loss at loss tokens,
    megatron-core's full loss under sequence parallelism, logits for evaluation).
    """

    def __init__(self, *args, unpadded_vocab_size: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = self.vocab_size if unpadded_vocab_size is None else unpadded_vocab_size
        if self.unpadded_vocab_size > self.vocab_size:
            raise ValueError(f"vocabulary of {self.unpadded_vocab_size} tokens does not fit the padded {self.vocab_size}")
        if self.post_process and self.unpadded_vocab_size < self.vocab_size:
            self.vocab_shard_start = self.output_layer.tp_group.rank() * self.output_layer.output_size_per_partition
            self.output_layer.register_forward_hook(self._mask_padded_vocabulary)
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

    def _mask_padded_vocabulary(self, output_layer, args, output):
        logits = output[0]
        columns = logits.shape[-1]
        # This rank's shard of the vocabulary, or all of it when the output layer gathered it.
        first = 0 if columns == self.vocab_size else self.vocab_shard_start
        valid = valid_vocab_columns(self.unpadded_vocab_size, columns, first)
        if valid == columns:
            return None
        # In place and outside autograd: no copy of the [tokens, vocab] logits, and the gradient
        # stays exact, since megatron's vocab-parallel cross entropy gives these columns a softmax
        # of 0. The lowest finite value rather than -inf: a shard of padding only (TP 4 on 300
        # tokens) would give inf - inf = nan in an online softmax such as Transformer Engine's.
        with torch.no_grad():
            logits[..., valid:] = torch.finfo(logits.dtype).min
        return None

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.loss_positions is None:
            return super().compute_language_model_loss(labels, logits)
        batch, seq = labels.shape
        selected_labels = labels.t().reshape(-1).index_select(0, self.loss_positions)
        selected_loss = super().compute_language_model_loss(selected_labels[None, :], logits)
        loss = selected_loss.new_zeros(seq * batch).index_copy(0, self.loss_positions, selected_loss.reshape(-1))
        return loss.view(seq, batch).t()
