"""Where a micro-batch's loss tokens are, in the order megatron-core's output layer sees them."""

import numpy as np
import torch

from symnoise_megatron.data.sft_dataset import Sample, collate
from symnoise_megatron.data.microbatch import concatenate


def microbatch():
    # Two samples: 6 and 9 tokens, the first 3 of each are prompt (mask 0).
    return collate([Sample(uid, np.arange(1, n + 2), np.r_[np.zeros(3), np.ones(n - 2)]) for uid, n in enumerate([6, 9])], 12)


def test_loss_positions_index_the_loss_tokens_in_sequence_major_order():
    mb = microbatch()
    positions = mb.positions_with_loss()
    seq, rows = mb.tokens.shape[1], mb.tokens.shape[0]
    picked = torch.zeros(seq * rows)
    picked[positions] = 1
    assert torch.equal(picked.view(seq, rows).t(), mb.loss_mask.float())  # [s, b] flat index -> [b, s] mask
    assert positions.numel() == int(mb.loss_mask.sum()) > 0


def test_positions_are_taken_on_the_host_when_moved_and_dropped_when_the_mask_changes():
    mb = microbatch()
    moved = mb.to("cpu")
    assert mb.loss_positions is None and torch.equal(moved.loss_positions, mb.positions_with_loss())
    cut = moved.truncated(8)
    assert cut.loss_positions is None and torch.equal(cut.positions_with_loss(), microbatch().truncated(8).positions_with_loss())
    doubled = concatenate([moved, moved])
    assert doubled.loss_positions is None and doubled.positions_with_loss().numel() == 2 * moved.loss_positions.numel()


def test_a_micro_batch_without_loss_tokens_keeps_one_position():
    mb = microbatch()
    mb.loss_mask.zero_()
    assert mb.positions_with_loss().tolist() == [0]
