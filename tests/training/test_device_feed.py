"""The schedule's data iterators: each micro-batch moves to the device once, just before its first
forward; the symmetric pair's copies share that one copy; nothing in the move reads the device."""

import numpy as np
import pytest
import torch

from symnoise_megatron.data.microbatch import concatenate, stage, thd_segments
from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.training.device_feed import DeviceFeed

FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "sample_uids", "lengths")


def sample(uid, n):
    return Sample(uid, np.arange(1, n + 2) % 50, (np.arange(n + 1) > 2).astype(np.uint8))


def padded(start=0):
    return collate([sample(start, 5), sample(start + 1, 9)], 12)


def packed():
    return concatenate(pack([sample(0, 5), sample(1, 9), sample(2, 3)], 12) + [empty_packed_row(12)])


def same(a, b):
    return all((getattr(a, f) is None and getattr(b, f) is None) or torch.equal(getattr(a, f), getattr(b, f))
               for f in FIELDS) and (torch.equal(torch.as_tensor(a.sign), torch.as_tensor(b.sign)))


@pytest.mark.parametrize("make", [padded, packed])
def test_concat_pairing_is_doubled_on_the_device_from_one_copy_with_the_hosts_positions_and_segments(make):
    mb = make()
    staged = stage(mb, NoiseConfig("symmetric", pairing="concat"))
    (run,) = staged.on_device("cpu")
    reference = mb.doubled()
    assert same(run, reference) and staged.rows == 2 * mb.size
    assert torch.equal(run.loss_positions, reference.positions_with_loss())
    if mb.packed:
        expected = thd_segments(reference.position_ids, reference.lengths)
        assert all(torch.equal(x, y) for x, y in zip(run.packed_segments[:2], expected[:2]))
        assert run.packed_segments.max_seqlen == expected.max_seqlen
    else:
        assert run.packed_segments is None


def test_microbatch_pairing_runs_both_signs_from_one_device_copy():
    staged = stage(padded(), NoiseConfig("symmetric", pairing="microbatch"))
    plus, minus = staged.on_device("cpu")
    assert (plus.sign, minus.sign) == (1, -1) and staged.runs == 2
    for field in FIELDS + ("loss_positions",):
        assert getattr(plus, field) is getattr(minus, field), field  # one copy, not two


def test_static_shapes_stage_no_loss_positions_and_a_fixed_max_seqlen():
    staged = stage(packed(), NoiseConfig("uniform"), loss_tokens=False, max_seqlen=12)
    (run,) = staged.on_device("cpu")
    assert run.loss_positions is None and run.packed_segments.max_seqlen == 12
    assert stage(packed(), NoiseConfig("uniform"), thd=False).packed_segments is None  # the local spec reads none


@pytest.mark.parametrize("chunks", [1, 2])
def test_each_micro_batch_moves_once_when_first_asked_for_and_is_let_go_after_its_last_chunk(chunks):
    """Interleaved stages: every model chunk of the rank reads each micro-batch in turn."""
    step = [stage(padded(2 * i), NoiseConfig("symmetric", pairing="microbatch")) for i in range(3)]
    feed = DeviceFeed(step, "cpu", chunks)
    iterators = feed.iterators() if chunks > 1 else [feed.iterators()]
    assert len(feed) == 6 and feed.moves == 0  # nothing moves before the schedule asks
    first = next(iterators[0])
    assert feed.moves == 1 and feed.resident == 1 and first.sign == 1
    taken = [first] + [next(iterators[0]) for _ in range(5)]
    assert feed.moves == 3
    assert [int(mb.sample_uids[0]) for mb in taken] == [0, 0, 2, 2, 4, 4] and [mb.sign for mb in taken] == [1, -1] * 3
    assert feed.resident == (0 if chunks == 1 else 3)
    for iterator in iterators[1:]:
        again = list(iterator)
        assert [a.tokens is b.tokens for a, b in zip(again, taken)] == [True] * 6  # the same device copies
    assert feed.resident == 0 and feed.moves == 3


def test_the_move_reads_nothing_back_from_the_device(monkeypatch):
    """No host sync in the step: the pair's doubling, signs and segments are device work only
    (a meta device stands for the GPU: any read back of its values fails)."""
    step = [stage(packed(), NoiseConfig("symmetric", pairing="concat")),
            stage(padded(), NoiseConfig("symmetric", pairing="microbatch"))]

    def read_back(name):
        return lambda *a, **k: pytest.fail(f"Tensor.{name} while moving: the host waits on the device")

    for name in ("__bool__", "item", "tolist", "nonzero", "cpu", "numpy", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, read_back(name))
    runs = list(DeviceFeed(step, "meta").iterators())
    monkeypatch.undo()
    assert [mb.tokens.device.type for mb in runs] == ["meta"] * 3 and runs[0].size == 2 * packed().size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_micro_batches_move_without_blocking():
    staged = stage(packed(), NoiseConfig("symmetric"), pin=True)
    assert staged.data.tokens.is_pinned() and staged.loss_positions.is_pinned() and staged.packed_segments.cu_seqlens.is_pinned()
    (run,) = DeviceFeed([staged], torch.device("cuda")).iterators()
    assert run.tokens.is_cuda and same(run.to("cpu"), packed().doubled())
