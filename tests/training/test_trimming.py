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
    assert {mb.tokens.shape[1] for mb in trimmed} == {32} and trimmed[0].attention_mask().shape[-2:] == (32, 32)
    for full, cut in zip(microbatches, trimmed):
        assert full.loss_mask[:, 32:].sum() == 0 and torch.equal(full.tokens[:, :32], cut.tokens)
        assert torch.equal(full.attention_mask()[:, :, :32, :32], cut.attention_mask())


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


@pytest.mark.parametrize("flags, multiple", [
    (dict(), 1), (dict(tensor_model_parallel_size=2), 1),  # TP alone splits no sequence
    (dict(tensor_model_parallel_size=4, sequence_parallel=True), 4), (dict(fp8_format="hybrid"), 16),
    (dict(tensor_model_parallel_size=8, sequence_parallel=True, fp8_format="e4m3"), 16),
    (dict(tensor_model_parallel_size=3, sequence_parallel=True, fp8_format="e4m3"), 48)])
def test_the_length_multiple_is_what_sequence_parallelism_and_fp8_need(flags, multiple):
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.batches import check_seq_length, required_length_multiple

    assert required_length_multiple(TrainingConfig.from_flags(**flags))[0] == multiple
    assert check_seq_length(TrainingConfig.from_flags(seq_length=96 * 16, **flags)) % multiple == 0


@pytest.mark.parametrize("flags, message", [
    (dict(tensor_model_parallel_size=2, sequence_parallel=True),
     "--seq-length 1001 must be a multiple of 2 (--sequence-parallel splits it over --tensor-model-parallel-size 2): "
     "use 1000 or 1002"),
    (dict(fp8_format="hybrid"), "--seq-length 1001 must be a multiple of 16 (--fp8-format's GEMMs take multiples of "
     "16 tokens): use 992 or 1008")])
def test_a_seq_length_a_step_could_not_run_at_is_refused_at_start_up(flags, message):
    """Issue 24: not hours into a run, when the data first fills a row to an odd length."""
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.batches import check_seq_length

    with pytest.raises(ValueError) as error:
        check_seq_length(TrainingConfig.from_flags(seq_length=1001, **flags))
    assert str(error.value) == message


def test_trimmed_lengths_keep_the_multiple_up_to_a_full_row():
    rows = [collate(samples([n]), 96) for n in (5, 50, 95)]
    for microbatch in rows:
        (cut,) = trimmed_to_longest([microbatch], 48)
        assert cut.tokens.shape[1] % 48 == 0 and cut.tokens.shape[1] >= int(microbatch.real_tokens().sum())
