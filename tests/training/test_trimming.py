"""Cutting a step's padding: only padding goes, every micro-batch keeps one length."""

import numpy as np
import torch

from symnoise_megatron.data.sft_dataset import Sample, collate, pack
from symnoise_megatron.training.batches import trimmed_to_longest


def samples(lengths):
    return [Sample(uid, np.arange(1, n + 2), np.ones(n + 1)) for uid, n in enumerate(lengths)]


def test_padded_rows_are_cut_to_the_longest_sample_rounded_up():
    microbatches = [collate(samples([5, 21]), 128), collate(samples([9, 3]), 128)]
    trimmed = trimmed_to_longest(microbatches, 16)
    assert {mb.tokens.shape[1] for mb in trimmed} == {32} and trimmed[0].attention_mask.shape[-2:] == (32, 32)
    for full, cut in zip(microbatches, trimmed):
        assert full.loss_mask[:, 32:].sum() == 0 and torch.equal(full.tokens[:, :32], cut.tokens)
        assert torch.equal(full.attention_mask[:, :, :32, :32], cut.attention_mask)


def test_packed_rows_keep_per_token_fields_and_a_full_row_is_not_cut():
    rows = pack(samples([40, 30, 20]), 64)
    trimmed = trimmed_to_longest(rows, 16)
    assert all(mb.tokens.shape[1] == 64 for mb in trimmed)  # the first row holds 60 of 64: rounded up, nothing to cut
    short = trimmed_to_longest(pack(samples([10, 7]), 64), 8)
    assert short[0].tokens.shape[1] == 24 and short[0].lengths.shape == (1, 24)
