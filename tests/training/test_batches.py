"""A step's micro-batches on the host: cut to the step's longest sample (only padding goes),
or exactly --seq-length with static shapes; what each pipeline stage builds; the noise scale."""

import numpy as np
import pytest
import torch

from symnoise_megatron.data.microbatch import concatenate
from symnoise_megatron.data.sft_dataset import Sample, collate, pack
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.training.batches import RankInputs, StepBatches, noise_scale_totals, trimmed_length


def samples(lengths):
    return [Sample(uid, np.arange(1, n + 2), np.ones(n + 1)) for uid, n in enumerate(lengths)]


class StoredSamples:
    """Samples as the trainer's data reads them: (tokens, loss mask) by index, and their stored
    lengths from the index file. ``reads`` counts the token reads."""

    def __init__(self, lengths):
        self.rows = [(np.arange(1, n + 2) % 97, (np.arange(n + 1) >= n // 3).astype(np.uint8)) for n in lengths]
        self.reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return self.rows[index]

    def sequence_length(self, index):
        return len(self.rows[index][0])


def step_batches(seq_length=128, micro_batch_size=2, **flags):
    config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, seq_length=seq_length,
                                       micro_batch_size=micro_batch_size, **flags)
    return StepBatches(config, pad_id=0, hidden_size=64)


def groups_of(count, micro_batch_size=2, start=0):
    uids = list(range(start, start + count))
    return [[(uid, uid - start) for uid in uids[i:i + micro_batch_size]] for i in range(0, count, micro_batch_size)]


LENGTHS = [5, 21, 9, 3, 40, 17, 11, 30]


@pytest.mark.parametrize("packed", [False, True])
def test_rows_are_cut_to_the_steps_longest_sample_and_static_shapes_keep_seq_length(packed):
    data = StoredSamples(LENGTHS)
    indices = np.arange(len(LENGTHS))
    trimmed = step_batches(pack_sequences=packed)(groups_of(8), indices, data)
    full = step_batches(pack_sequences=packed, static_shapes=True)(groups_of(8), indices, data)
    # Padded: the longest sample has 40 input tokens; packed: the fullest row holds 40 + 30 + ... of 128.
    longest = 40 if not packed else max(int(mb.real_tokens().sum(1).max()) for mb in full)
    assert {mb.tokens.shape[1] for mb in trimmed} == {longest} and {mb.length for mb in full} == {128}
    assert len(trimmed) == len(full)
    for cut, whole in zip(trimmed, full):
        assert whole.loss_mask[:, longest:].sum() == 0 and not whole.real_tokens()[:, longest:].any()
        for name in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(getattr(whole, name)[:, :longest], getattr(cut, name)), name
        for name in ("sample_uids", "lengths"):
            value = getattr(whole, name)
            assert torch.equal(value[:, :longest] if value.dim() == 2 else value, getattr(cut, name)), name
        assert torch.equal(whole.attention_mask()[..., :longest, :longest], cut.attention_mask())


def test_step_rows_equal_collate_and_pack_of_the_same_samples():
    data = StoredSamples(LENGTHS)
    stored = [Sample(uid, *data.rows[uid]) for uid in range(8)]
    padded = step_batches(static_shapes=True)(groups_of(8), np.arange(8), data)
    for index, mb in enumerate(padded):
        expected = collate(stored[2 * index:2 * index + 2], 128)
        assert all(torch.equal(getattr(mb, name), getattr(expected, name)) for name in
                   ("tokens", "labels", "loss_mask", "position_ids", "sample_uids", "lengths"))
    packed = step_batches(pack_sequences=True, static_shapes=True, micro_batch_size=1)(groups_of(8, 1), np.arange(8), data)
    for mb, expected in zip(packed, pack(stored, 128)):
        assert all(torch.equal(getattr(mb, name), getattr(expected, name)) for name in
                   ("tokens", "labels", "loss_mask", "position_ids", "sample_uids", "lengths"))


def test_trimmed_lengths_keep_the_multiple_up_to_a_full_row():
    assert [trimmed_length(n, 96, 48) for n in (0, 5, 48, 50, 95, 96)] == [48, 48, 48, 96, 96, 96]
    assert [trimmed_length(n, 128, 1) for n in (1, 37, 128)] == [1, 37, 128]


@pytest.mark.parametrize("packed", [False, True])
def test_each_pipeline_stage_builds_what_it_reads_and_a_middle_stage_reads_no_token(packed):
    """Issue 26: a middle stage collated the whole step; now it lays out the rows from the samples'
    lengths (the index file) and builds positions, lengths and uids only. Every stage agrees on
    the rows and their length (the shape the stages exchange)."""
    indices = np.arange(len(LENGTHS))
    built = {}
    for name, rank in (("all", RankInputs()), ("first", RankInputs(targets=False)), ("last", RankInputs(tokens=False)),
                       ("middle", RankInputs(tokens=False, targets=False))):
        batches = step_batches(pack_sequences=packed, pipeline_model_parallel_size=4)
        batches.rank = rank
        data = StoredSamples(LENGTHS)
        built[name] = [s.data for s in batches.staged(groups_of(8), indices, data, NoiseConfig("symmetric")).staged]
        built[name + " reads"] = data.reads
    assert built["middle reads"] == 0 and built["first reads"] == built["all reads"] == 8
    for name, fields in (("first", ("tokens",)), ("last", ("labels", "loss_mask")), ("middle", ())):
        assert len(built[name]) == len(built["all"])
        for mb, reference in zip(built[name], built["all"]):
            for field in ("tokens", "labels", "loss_mask"):
                value = getattr(mb, field)
                assert (value is not None) == (field in fields), (name, field)
                assert value is None or torch.equal(value, getattr(reference, field))
            for field in ("position_ids", "sample_uids", "lengths"):
                assert torch.equal(getattr(mb, field), getattr(reference, field)), (name, field)


def test_the_logged_noise_scale_counts_each_sample_once_padded_or_packed():
    padded = collate(samples([5, 21]), 32)
    packed = pack([Sample(uid + 10, np.arange(1, n + 2), np.ones(n + 1)) for uid, n in enumerate([40, 30, 20])], 64)
    alpha, hidden = 5.0, 64
    total, count = noise_scale_totals([padded] + packed, NoiseConfig("symmetric", alpha), hidden).tolist()
    assert count == 5  # a packed sample spans many positions and rows of padding count for nothing
    assert total == pytest.approx(sum(alpha / (n * hidden) ** 0.5 for n in (5, 21, 40, 30, 20)), rel=1e-6)
    assert noise_scale_totals([padded], NoiseConfig("none", alpha), hidden).tolist() == [0.0, 0.0]


def test_a_staged_step_counts_its_positions_and_runs_and_takes_loss_positions_only_with_dynamic_shapes():
    data, indices = StoredSamples(LENGTHS), np.arange(8)
    noise = NoiseConfig("symmetric", pairing="microbatch")
    dynamic = step_batches().staged(groups_of(8), indices, data, noise)
    static = step_batches(static_shapes=True).staged(groups_of(8), indices, data, noise)
    assert dynamic.runs == static.runs == 8  # 4 micro-batches, each twice
    assert dynamic.positions == 4 * 2 * 40 * 2 and static.positions == 4 * 2 * 128 * 2
    assert all(s.loss_positions is not None for s in dynamic.staged) and all(s.loss_positions is None for s in static.staged)
    total = noise_scale_totals([s.data for s in dynamic.staged], noise, 64)
    assert torch.equal(dynamic.noise_totals, total) and torch.equal(static.noise_totals, total)


@pytest.mark.parametrize("flags, multiple", [
    (dict(), 1), (dict(tensor_model_parallel_size=2), 1),  # TP alone splits no sequence
    (dict(tensor_model_parallel_size=4, sequence_parallel=True), 4), (dict(fp8_format="hybrid"), 16),
    # Transformer Engine checks FP8 GEMM inputs as each rank holds them: the sequence-parallel shard.
    (dict(tensor_model_parallel_size=8, sequence_parallel=True, fp8_format="e4m3"), 128),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, fp8_format="hybrid", fp8_recipe="tensorwise"), 32),
    (dict(tensor_model_parallel_size=3, sequence_parallel=True, fp8_format="e4m3"), 48),
    (dict(tensor_model_parallel_size=4, sequence_parallel=True, fp8_format="e4m3", fp8_recipe="blockwise"), 512),
    (dict(fp8_format="e4m3", fp8_recipe="blockwise"), 16)])
def test_the_length_multiple_is_what_sequence_parallelism_and_fp8_need(flags, multiple):
    from symnoise_megatron.training.batches import check_seq_length, required_length_multiple

    assert required_length_multiple(TrainingConfig.from_flags(**flags))[0] == multiple
    assert check_seq_length(TrainingConfig.from_flags(seq_length=96 * 16, **flags)) % multiple == 0


@pytest.mark.parametrize("flags, message", [
    (dict(tensor_model_parallel_size=2, sequence_parallel=True),
     "--seq-length 1001 must be a multiple of 2 (--sequence-parallel splits it over --tensor-model-parallel-size 2): "
     "use 1000 or 1002"),
    (dict(fp8_format="hybrid"), "--seq-length 1001 must be a multiple of 16 (--fp8-format's GEMMs take multiples of "
     "16 tokens): use 992 or 1008"),
    (dict(tensor_model_parallel_size=8, sequence_parallel=True, fp8_format="hybrid"),
     "--seq-length 1001 must be a multiple of 128 (--sequence-parallel splits it over --tensor-model-parallel-size 8; "
     "--fp8-format's GEMMs take multiples of 16 tokens on each of the 8 sequence-parallel ranks): use 896 or 1024")])
def test_a_seq_length_a_step_could_not_run_at_is_refused_at_start_up(flags, message):
    """Issue 24: not hours into a run, when the data first fills a row to an odd length."""
    from symnoise_megatron.training.batches import check_seq_length

    with pytest.raises(ValueError) as error:
        check_seq_length(TrainingConfig.from_flags(seq_length=1001, **flags))
    assert str(error.value) == message


def test_packed_pipeline_steps_fill_out_with_empty_rows_of_the_steps_length():
    batches = step_batches(pack_sequences=True, pipeline_model_parallel_size=2, micro_batch_size=2)
    rows = batches(groups_of(2), np.arange(2), StoredSamples([50, 90]))  # two rows (140 > 128): one micro-batch
    assert len(rows) == 1 and rows[0].size == 2 and rows[0].length == 90
    rows = batches(groups_of(4), np.arange(4), StoredSamples([5, 90, 100, 110]))  # rows of 110 + 5, 100, 90; a filler
    assert len(rows) == 2 and rows[1].lengths[1].sum() == 0 and {mb.length for mb in rows} == {115}
    assert concatenate(rows).size == 4 and rows[1].tokens[1].eq(0).all()


def test_static_packed_steps_fill_out_every_micro_batch_without_pipeline_stages():
    """TP comm overlap's userbuffers and CUDA graphs take one shape: a step whose samples pack into
    fewer rows than a micro-batch still hands the model --micro-batch-size rows."""
    data = StoredSamples([50, 90, 20])  # two packed rows of 128 (140 > 128)
    for static in (False, True):
        rows = step_batches(pack_sequences=True, micro_batch_size=4, static_shapes=static)(
            groups_of(3, 4), np.arange(3), data)
        assert [mb.size for mb in rows] == [4 if static else 2]
        assert (rows[0].length == 128) == static
        assert sorted(int(u) for mb in rows for u in mb.sample_uids.unique() if u >= 0) == [0, 1, 2]
