"""Weighted blends: Megatron-LM's --data-path form, and a sample order that draws each prefix in
proportion to its weight, over as many of its epochs as the weight needs, the same under any
data-parallel size."""

import numpy as np
import pytest

from symnoise_megatron.data.blend import BlendEntry, BlendOrder, normalized_weights, parse_blend
from symnoise_megatron.data.sampler import GlobalBatchSampler


def test_megatron_lms_forms_of_data_path():
    assert parse_blend(["data/a"]) == [BlendEntry("data/a")]
    assert parse_blend(["0.7", "data/a", "0.3", "data/b"]) == [BlendEntry("data/a", 0.7), BlendEntry("data/b", 0.3)]
    assert parse_blend(["30", "a", "70", "b"]) == [BlendEntry("a", 30.0), BlendEntry("b", 70.0)]
    assert parse_blend(["a", "b"]) == [BlendEntry("a"), BlendEntry("b")]  # weighted by their samples
    assert normalized_weights(parse_blend(["30", "a", "70", "b"]), [5, 5]) == pytest.approx([0.3, 0.7])
    assert normalized_weights(parse_blend(["a", "b"]), [10, 30]) == pytest.approx([0.25, 0.75])


@pytest.mark.parametrize("values, message", [
    (["0.7", "a", "0.3"], "--data-path 0.7 a 0.3: 3 values, so a weight lacks its prefix; give W1 PREFIX1 W2 PREFIX2"),
    (["0.7", "a", "heavy", "b"], "--data-path: 'heavy' (before 'b') is not a weight; give W1 PREFIX1 W2 PREFIX2"),
    (["0.7", "a", "-0.3", "b"], "--data-path: the weight -0.3 of b is not a positive number"),
    (["0", "a", "1", "b"], "--data-path: the weight 0 of a is not a positive number"),
    (["nan", "a", "1", "b"], "--data-path: the weight nan of a is not a positive number"),
    (["a", "0.3", "b"], "--data-path a 0.3 b: '0.3' looks like a weight, but the list does not start with one"),
    ([], "--data-path is required"),
])
def test_weights_that_do_not_parse_or_are_not_positive_are_refused_in_one_line(values, message):
    with pytest.raises(ValueError) as error:
        parse_blend(values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def draws(order, total):
    """(part, position in that part) of the run's first ``total`` samples."""
    starts = np.append(order.part_starts, order.num_samples)
    out = []
    for consumed in range(total):
        position = order.sample_at(consumed)
        part = int(np.searchsorted(starts, position, side="right")) - 1
        out.append((part, position - int(starts[part])))
    return out


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [0.05, 0.95]])
def test_the_mix_after_every_global_batch_equals_the_weights_within_one_sample(weights):
    global_batch, steps = 8, 60
    sizes = [40, 13, 7][:len(weights)]
    order = BlendOrder(sizes, weights, seed=3)
    parts = np.array([part for part, _ in draws(order, global_batch * steps)])
    for step in range(1, steps + 1):
        seen = np.bincount(parts[:step * global_batch], minlength=len(weights))
        assert np.abs(seen - np.array(weights) * step * global_batch).max() <= 1, (step, seen)


def test_each_prefix_is_seen_over_as_many_of_its_epochs_as_its_weight_needs():
    # 0.5 of 120 samples from a prefix of 13: 60 draws, four and a bit epochs of it; the other
    # prefix (40 samples) gives 60 draws, one and a half epochs.
    order = BlendOrder([40, 13], [0.5, 0.5], seed=11)
    drawn = draws(order, 120)
    for part, size in ((0, 40), (1, 13)):
        positions = [position for p, position in drawn if p == part]
        assert len(positions) == 60
        for epoch in range(60 // size):  # every whole epoch holds each sample once
            assert sorted(positions[epoch * size:(epoch + 1) * size]) == list(range(size))
        counts = np.bincount(positions, minlength=size)
        assert counts.max() - counts.min() <= 1  # the last epoch only partly
        # each epoch in its own order
        assert positions[:size] != positions[size:2 * size]


def test_the_order_is_a_function_of_the_seed_and_the_consumed_count_alone():
    a, b = BlendOrder([40, 13], [0.7, 0.3], seed=5), BlendOrder([40, 13], [0.7, 0.3], seed=5)
    late = [a.sample_at(n) for n in range(300, 200, -1)]  # asked backwards, from a fresh table
    assert late == [b.sample_at(n) for n in range(300, 200, -1)]
    assert [a.sample_at(n) for n in range(100)] != [BlendOrder([40, 13], [0.7, 0.3], seed=6).sample_at(n) for n in range(100)]
    # Two parts of one size are shuffled apart.
    same_size = BlendOrder([20, 20], [0.5, 0.5], seed=5)
    assert [p for part, p in draws(same_size, 40) if part == 0] != [p for part, p in draws(same_size, 40) if part == 1]


def test_data_parallel_ranks_share_out_the_same_samples_as_one_rank():
    order = BlendOrder([40, 13], [0.7, 0.3], seed=5)
    one = GlobalBatchSampler(order, 8, 2)
    ranks = [GlobalBatchSampler(order, 8, 2, data_parallel_rank=r, data_parallel_size=2) for r in range(2)]
    for _ in range(10):
        whole = [pair for mb in one.next_global_batch() for pair in mb]
        shared = [pair for sampler in ranks for mb in sampler.next_global_batch() for pair in mb]
        assert shared == whole
        assert [uid for uid, _ in whole] == list(range(one.consumed_samples - 8, one.consumed_samples))
