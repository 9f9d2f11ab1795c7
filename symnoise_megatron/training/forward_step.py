"""The forward step handed to megatron-core's pipeline schedules."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from symnoise_megatron.data.microbatch import MicroBatch
from symnoise_megatron.model.builder import built_with_transformer_engine
from symnoise_megatron.model.packed_seq import packed_seq_params, thd_loss_positions
from symnoise_megatron.model.step_inputs import step_inputs


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


def packs_in_thd(model, microbatch: MicroBatch) -> bool:
    """Packed rows (per-token lengths) through a chunk built with the Transformer Engine spec,
    whose attention separates samples by cumulative lengths instead of the dense mask."""
    return microbatch.packed and built_with_transformer_engine(model)


def schedule_shape(model, microbatch: MicroBatch, rows: int):
    """(seq_length, micro_batch_size) the pipeline schedule shapes its stage buffers with:
    packed rows on the thd path travel as one row of ``rows * s`` tokens."""
    seq = microbatch.length
    return (rows * seq, 1) if packs_in_thd(model, microbatch) else (seq, rows)


def _check_thd_input(model, rows: int, seq: int) -> None:
    """A later pipeline stage must receive the rows laid end to end ([b * s, 1, h]); the
    schedule shapes its buffers from the ``seq_length`` and ``micro_batch_size`` it was given."""
    for module in model.modules():
        received = getattr(getattr(module, "decoder", None), "input_tensor", None)
        if received is not None and received.shape[1] != 1:
            raise ValueError(
                f"packed rows on the Transformer Engine spec travel between pipeline stages as [b * s, 1, h]; this stage "
                f"received {tuple(received.shape)}: run the schedule with seq_length={rows * seq}, micro_batch_size=1")


def forward_step(data_iterator: Iterator[MicroBatch], model, every_position: bool = False):
    """Run one micro-batch through this rank's model chunk; return output and loss function.

    The micro-batch comes from ``DeviceFeed`` (moved just before this forward, its loss positions
    and thd segments taken on the host). ``every_position`` (static shapes): logits at every
    position, a buffer of one shape every step, instead of at the loss tokens. On a later pipeline
    stage the tokens are None, on an earlier one the labels and loss mask: the model reads neither
    there. The dense attention mask is built here, on the device, for the local spec only."""
    microbatch = next(data_iterator)
    selected = None if every_position else microbatch.positions_with_loss()
    if packs_in_thd(model, microbatch):
        if microbatch.packed_segments is None:
            raise ValueError("packed rows reach the Transformer Engine spec without their thd segments: "
                             "stage micro-batches with data.microbatch.stage (or move them with MicroBatch.to), "
                             "which takes them on the host")
        # megatron-core's thd attention takes one row: the micro-batch's rows laid end to end.
        # The noise batch stays [b, s]; the embedding reads the flat tokens in that order.
        rows, seq = microbatch.position_ids.shape
        _check_thd_input(model, rows, seq)
        flat = lambda t: None if t is None else t.reshape(1, rows * seq)  # noqa: E731
        with step_inputs(model, microbatch.noise_batch(),
                         None if selected is None else thd_loss_positions(selected, rows, seq)):
            output = model(
                flat(microbatch.tokens),
                flat(microbatch.position_ids),
                None,
                labels=flat(microbatch.labels),
                packed_seq_params=packed_seq_params(microbatch.packed_segments),
            )
        # The per-token losses come back [1, b * s]: row-major, as the loss mask flattens.
        return output, partial(token_loss, microbatch.loss_mask)
    with step_inputs(model, microbatch.noise_batch(), selected):
        output = model(
            microbatch.tokens,
            microbatch.position_ids,
            None if built_with_transformer_engine(model) else microbatch.attention_mask(),
            labels=microbatch.labels,
        )
    return output, partial(token_loss, microbatch.loss_mask)
