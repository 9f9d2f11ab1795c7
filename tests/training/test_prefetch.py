"""The next step's batches built in a background thread while this one runs, without changing
which batch a step gets or what the sampler has counted."""

import threading

import pytest

from symnoise_megatron.data.sampler import GlobalBatchSampler, SampleOrder
from symnoise_megatron.training.prefetch import Prefetcher


def test_the_next_batch_is_built_in_the_background_while_the_caller_works():
    """The build of key 1 starts when key 0 is handed over and waits for the caller's work to start:
    it can only finish because it runs beside the caller (no timing)."""
    caller_working = threading.Event()
    built_in = {}

    def build(key):
        built_in[key] = threading.current_thread().name
        if key == 1:
            assert caller_working.wait(timeout=30), "the build of key 1 did not run beside the caller"
        return key * 10

    prefetcher = Prefetcher(build, "test")
    try:
        assert prefetcher.get(0, next_key=1) == 0
        caller_working.set()  # the caller's "step": the build of key 1 is already under way
        assert prefetcher.get(1, next_key=None) == 10
    finally:
        prefetcher.close()
    assert built_in[0] == threading.current_thread().name and built_in[1].startswith("symnoise-test")


def test_a_request_for_another_key_builds_it_and_errors_reach_the_caller():
    calls = []

    def build(key):
        calls.append(key)
        if key == 7:
            raise ValueError("row 7 is bad")
        return key

    prefetcher = Prefetcher(build)
    try:
        prefetcher.get(0, next_key=1)
        assert prefetcher.get(5, next_key=7) == 5  # 1 was built ahead and dropped
        with pytest.raises(ValueError, match="row 7 is bad"):
            prefetcher.get(7)
    finally:
        prefetcher.close()
    assert calls == [0, 1, 5, 7]


def test_batches_built_ahead_are_the_batches_of_their_turn_and_the_sampler_counts_only_those_taken():
    """Resume: a checkpoint records the sampler's count, so a batch built ahead and never trained
    on (a stop, an exit interval) must not be in it."""
    order = SampleOrder(37, seed=3)
    straight = GlobalBatchSampler(order, global_batch_size=8, micro_batch_size=2, data_parallel_rank=1,
                                  data_parallel_size=2)
    expected = [straight.next_global_batch() for _ in range(4)]
    sampler = GlobalBatchSampler(SampleOrder(37, seed=3), 8, 2, 1, 2)
    prefetcher = Prefetcher(sampler.batch_at)
    try:
        taken = []
        for step in range(3):
            consumed = sampler.consumed_samples
            taken.append(prefetcher.get(consumed, consumed + 8))
            sampler.advance()
        assert sampler.consumed_samples == 24 and prefetcher.pending[0] == 24  # the fourth is built, not counted
    finally:
        prefetcher.close()
    assert taken == expected[:3]
    resumed = GlobalBatchSampler(SampleOrder(37, seed=3), 8, 2, 1, 2)
    resumed.load_state_dict(sampler.state_dict())
    assert resumed.next_global_batch() == expected[3]


def test_settle_waits_for_the_build_in_flight_and_keeps_its_result():
    import threading

    from symnoise_megatron.training.prefetch import Prefetcher

    release, builds = threading.Event(), []

    def build(key):
        if key == 2:
            release.wait(5)
        builds.append(key)
        return key * 10

    prefetcher = Prefetcher(build)
    assert prefetcher.get(1, 2) == 10
    threading.Timer(0.2, release.set).start()
    prefetcher.settle()
    assert builds == [1, 2]  # finished before settle returned
    assert prefetcher.get(2) == 20 and builds == [1, 2]  # taken from the background, not built again
    prefetcher.close()
