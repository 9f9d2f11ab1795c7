"""The sample order: resumable exactly, no repeats within an epoch across DP ranks, reshuffled epochs."""

import pytest

from symnoise_megatron.data.sampler import GlobalBatchSampler, SampleOrder


def run(order, steps, dp_size=1, consumed=0, global_batch=8, micro_batch=2):
    """Per step, per DP rank: the list of (uid, index) pairs it trains on."""
    samplers = [GlobalBatchSampler(order, global_batch, micro_batch, rank, dp_size, consumed) for rank in range(dp_size)]
    return [[[pair for mb in s.next_global_batch() for pair in mb] for s in samplers] for _ in range(steps)]


def test_resume_gives_the_same_sequence():
    order = SampleOrder(num_samples=21, seed=3)
    straight = run(order, steps=10)
    sampler = GlobalBatchSampler(SampleOrder(21, seed=3), 8, 2)
    first_half = [[[p for mb in sampler.next_global_batch() for p in mb]] for _ in range(5)]
    state = sampler.state_dict()
    resumed = GlobalBatchSampler(SampleOrder(21, seed=3), 8, 2)
    resumed.load_state_dict(state)
    second_half = [[[p for mb in resumed.next_global_batch() for p in mb]] for _ in range(5)]
    assert first_half + second_half == straight


def test_no_sample_twice_in_an_epoch_across_data_parallel_ranks():
    order = SampleOrder(num_samples=64, seed=1)
    steps = run(order, steps=8, dp_size=2)  # 8 x 8 = one epoch exactly
    indices = [index for step in steps for rank in step for _, index in rank]
    assert sorted(indices) == list(range(64))
    uids = [uid for step in steps for rank in step for uid, _ in rank]
    assert sorted(uids) == list(range(64))


def test_epochs_are_reshuffled_and_seeded():
    order = SampleOrder(num_samples=50, seed=7)
    first = [order.sample_at(i) for i in range(50)]
    second = [order.sample_at(i) for i in range(50, 100)]
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second
    assert first == [SampleOrder(50, seed=7).sample_at(i) for i in range(50)]
    assert first != [SampleOrder(50, seed=8).sample_at(i) for i in range(50)]


def test_data_parallel_split_matches_single_rank_union():
    order = SampleOrder(num_samples=40, seed=2)
    single = run(order, steps=3, dp_size=1)
    split = run(order, steps=3, dp_size=4)
    for step_single, step_split in zip(single, split):
        assert step_single[0] == [pair for rank in step_split for pair in rank]


def test_bad_batch_shapes_and_mismatched_resume_are_rejected():
    with pytest.raises(ValueError, match="not divisible by micro-batch size"):
        GlobalBatchSampler(SampleOrder(10), global_batch_size=6, micro_batch_size=4)
    sampler = GlobalBatchSampler(SampleOrder(10, seed=1), 4, 2)
    with pytest.raises(ValueError, match="does not match"):
        sampler.load_state_dict({"consumed_samples": 4, "seed": 1, "num_samples": 11, "global_batch_size": 4})
