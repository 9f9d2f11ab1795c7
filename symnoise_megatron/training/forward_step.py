"""The forward step handed to megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from symnoise_megatron.model.loss_tokens import loss_tokens_only
from symnoise_megatron.noise.embedding import set_noise_batch
from symnoise_megatron.training.microbatch import MicroBatch


def token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed loss over loss tokens and their count (``calculate_per_token_loss``).

    megatron-core divides the gradients by the token count of the whole global batch, so a
    symmetric pair's loss is the mean over the loss tokens of both copies whichever pairing
    carries them.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def forward_step(data_iterator: Iterator[MicroBatch], model):
    """Run one micro-batch through this rank's model chunk; return output and loss function."""
    microbatch = next(data_iterator)
    set_noise_batch(model, microbatch.noise_batch())
    with loss_tokens_only(model, microbatch.positions_with_loss()):
        output = model(
            microbatch.tokens,
            microbatch.position_ids,
            microbatch.attention_mask,
            labels=microbatch.labels,
        )
    return output, partial(token_loss, microbatch.loss_mask)
