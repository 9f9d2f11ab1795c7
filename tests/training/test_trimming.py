"""Cutting a step's padding: only padding goes, every micro-batch keeps one length."""

import numpy as np
import pytest
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


def test_the_logged_noise_scale_counts_each_sample_once_padded_or_packed():
    from symnoise_megatron.noise.config import NoiseConfig
    from symnoise_megatron.training.batches import noise_scale_totals

    padded = collate(samples([5, 21]), 32)
    packed = pack([Sample(uid + 10, np.arange(1, n + 2), np.ones(n + 1)) for uid, n in enumerate([40, 30, 20])], 64)
    alpha, hidden = 5.0, 64
    total, count = noise_scale_totals([padded] + packed, NoiseConfig("symmetric", alpha), hidden).tolist()
    assert count == 5  # a packed sample spans many positions and rows of padding count for nothing
    assert total == pytest.approx(sum(alpha / (n * hidden) ** 0.5 for n in (5, 21, 40, 30, 20)), rel=1e-6)
    assert noise_scale_totals([padded], NoiseConfig("none", alpha), hidden).tolist() == [0.0, 0.0]
