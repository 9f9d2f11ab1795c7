"""Packed rows as Transformer Engine's thd sequences, and the forward step that hands them over."""

import numpy as np
import pytest
import torch

from symnoise_megatron.data.microbatch import attention_mask_from_positions, concatenate, thd_segments
from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.model.packed_seq import packed_seq_params, thd_loss_positions
from symnoise_megatron.training.forward_step import forward_step

SEQ = 8


def sample(uid, n, prompt=1):
    """``n`` input tokens (the stored sequence has n + 1), the first ``prompt`` without loss."""
    return Sample(uid, np.arange(10 * uid + 1, 10 * uid + n + 2), np.r_[np.zeros(prompt + 1), np.ones(n - prompt)])


def packed_rows():
    # First-fit decreasing into rows of 8: row 0 = uid 0 (5) + uid 2 (3), full;
    # row 1 = uid 1 (2) + uid 3 (4) + 2 tokens of padding.
    rows = pack([sample(0, 5), sample(1, 2), sample(2, 3), sample(3, 4)], SEQ)
    assert [r.sample_uids[0].tolist() for r in rows] == [[0, 0, 0, 0, 0, 2, 2, 2], [1, 1, 3, 3, 3, 3, 3, 3]]
    return rows


def test_cu_seqlens_of_packed_rows_with_a_padded_tail_and_an_empty_filler_row():
    mb = concatenate(packed_rows() + [empty_packed_row(SEQ)])
    segments = thd_segments(mb.position_ids, mb.lengths)
    # Laid end to end: [0 0 0 0 0 2 2 2 | 1 1 3 3 3 3 p p | p p p p p p p p]
    assert segments.cu_seqlens.tolist() == [0, 5, 8, 10, 14, 14]
    assert segments.cu_seqlens_padded.tolist() == [0, 5, 8, 10, 16, 24]
    assert segments.max_seqlen == 8
    assert segments.cu_seqlens.dtype == segments.cu_seqlens_padded.dtype == torch.int32


def test_cu_seqlens_of_a_doubled_symmetric_micro_batch():
    mb = concatenate(packed_rows()).doubled()
    segments = thd_segments(mb.position_ids, mb.lengths)
    assert segments.cu_seqlens.tolist() == [0, 5, 8, 10, 14, 19, 22, 24, 28]
    assert segments.cu_seqlens_padded.tolist() == [0, 5, 8, 10, 16, 21, 24, 26, 32]
    assert segments.max_seqlen == 6


def test_padded_rows_are_one_sequence_each_and_after_trimming():
    mb = collate([sample(0, 5), sample(1, 3)], SEQ).truncated(6)
    segments = thd_segments(mb.position_ids, mb.lengths)
    assert segments.cu_seqlens.tolist() == [0, 5, 8]
    assert segments.cu_seqlens_padded.tolist() == [0, 6, 12]
    assert segments.max_seqlen == 6


def test_inconsistent_rows_are_refused():
    mb = concatenate(packed_rows())
    shifted = mb.position_ids.clone()
    shifted[1] += 3
    with pytest.raises(ValueError, match="row 1 does not start a sample"):
        thd_segments(shifted, mb.lengths)
    lengths = mb.lengths.clone()
    lengths[1, 2:] = 9
    with pytest.raises(ValueError, match=r"token 10 \(row 1\) has length 9 but only 6"):
        thd_segments(mb.position_ids, lengths)


def test_megatron_packed_seq_params():
    mb = concatenate(packed_rows()).to("cpu")
    params = packed_seq_params(mb.packed_segments)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 5, 8, 10, 14]
    assert params.cu_seqlens_q_padded.tolist() == params.cu_seqlens_kv_padded.tolist() == [0, 5, 8, 10, 16]
    assert params.max_seqlen_q == params.max_seqlen_kv == 6


def test_loss_positions_of_rows_laid_end_to_end():
    mb = concatenate(packed_rows()).doubled()
    rows, seq = mb.tokens.shape
    positions = thd_loss_positions(mb.positions_with_loss(), rows, seq)
    assert sorted(positions.tolist()) == mb.loss_mask.reshape(-1).nonzero().squeeze(1).tolist()


class RecordingModel(torch.nn.Module):
    """Stands in for a model chunk: records what the forward step passes, returns per-token
    losses that are each token's row-major index."""

    def __init__(self, transformer_engine: bool):
        super().__init__()
        self.packed_rows_in_thd = transformer_engine
        self.calls = []

    def forward(self, tokens, position_ids, attention_mask, labels=None, **kwargs):
        self.calls.append(dict(tokens=tokens, position_ids=position_ids, attention_mask=attention_mask, **kwargs))
        return torch.arange(tokens.numel(), dtype=torch.float32).reshape(tokens.shape)


def test_the_forward_step_passes_thd_params_only_on_the_transformer_engine_path():
    packed = concatenate(packed_rows()).doubled().to("cpu")
    padded = collate([sample(0, 5), sample(1, 3)], SEQ).to("cpu")
    te, local = RecordingModel(True), RecordingModel(False)
    losses = {}
    for name, model, mb in (("te_packed", te, packed), ("local_packed", local, packed), ("te_padded", te, padded)):
        output, loss_func = forward_step(iter([mb]), model)
        losses[name] = loss_func(output)[0]
    te_packed, te_padded = te.calls
    assert te_packed["tokens"].shape == (1, 4 * SEQ) and torch.equal(te_packed["tokens"], packed.tokens.reshape(1, -1))
    assert torch.equal(te_packed["position_ids"], packed.position_ids.reshape(1, -1))
    assert te_packed["attention_mask"] is None
    params = te_packed["packed_seq_params"]
    assert params.cu_seqlens_q.tolist() == [0, 5, 8, 10, 14, 19, 22, 24, 28]
    assert params.cu_seqlens_q_padded.tolist() == [0, 5, 8, 10, 16, 21, 24, 26, 32]
    # Without packing TE's causal attention is exact on padded rows: no thd, and no mask either.
    assert "packed_seq_params" not in te_padded and te_padded["tokens"].shape == (2, SEQ)
    assert te_padded["attention_mask"] is None
    (local_packed,) = local.calls
    assert "packed_seq_params" not in local_packed and local_packed["tokens"].shape == (4, SEQ)
    assert torch.equal(local_packed["attention_mask"], attention_mask_from_positions(packed.position_ids))
    # The loss adds the same tokens' losses whichever layout the model saw.
    flat_index = torch.arange(packed.tokens.numel(), dtype=torch.float32)
    assert float(losses["te_packed"]) == float((flat_index * packed.loss_mask.reshape(-1)).sum())


def test_the_pipeline_schedule_passes_packed_rows_on_the_thd_path_as_one_row():
    # Stages exchange [s, b, h] buffers shaped from (seq_length, micro_batch_size): on the thd
    # path a doubled micro-batch of 4 packed rows travels as one row of 4 * SEQ tokens.
    from symnoise_megatron.training.forward_step import schedule_shape

    packed = concatenate(packed_rows()).doubled()
    padded = collate([sample(0, 5), sample(1, 3)], SEQ)
    assert schedule_shape(RecordingModel(True), packed, rows=4) == (4 * SEQ, 1)
    assert schedule_shape(RecordingModel(False), packed, rows=4) == (SEQ, 4)
    assert schedule_shape(RecordingModel(True), padded, rows=2) == (SEQ, 2)


def test_the_host_takes_the_thd_segments_and_the_forward_step_reads_no_device_tensor_back(monkeypatch):
    """Issue 24: the boundaries are computed once, on the host, when the micro-batch moves; the
    forward step of every stage only hands them over (no .to("cpu") of device tensors)."""
    from symnoise_megatron.data import microbatch as microbatch_module

    packed = concatenate(packed_rows() + [empty_packed_row(SEQ)]).doubled()
    moved = packed.to("cpu")
    expected = thd_segments(packed.position_ids, packed.lengths)
    assert moved.packed_segments.cu_seqlens.tolist() == expected.cu_seqlens.tolist() == [0, 5, 8, 10, 14, 14, 19, 22, 24, 28, 28]
    assert moved.packed_segments.cu_seqlens_padded.tolist() == expected.cu_seqlens_padded.tolist()
    assert collate([sample(0, 5)], SEQ).to("cpu").packed_segments is None  # padded rows need none
    assert moved.truncated(6).packed_segments is None  # cut rows have other boundaries
    model = RecordingModel(True)
    monkeypatch.setattr(microbatch_module, "thd_segments", lambda *a: pytest.fail("segments computed in the step"))

    def read_back(name):
        return lambda *a, **k: pytest.fail(f"Tensor.{name} in the step: the host waits on the device")

    # What reads a device tensor back on the host: none of it may run in the step.
    for name in ("__bool__", "item", "tolist", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back(name))
    move = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: read_back("to('cpu')")() if "cpu" in map(str, (
        *a, *k.values())) else move(self, *a, **k))
    forward_step(iter([moved]), model)
    monkeypatch.undo()
    assert model.calls[0]["packed_seq_params"].cu_seqlens_q is moved.packed_segments.cu_seqlens
    with pytest.raises(ValueError, match="MicroBatch.to"):
        forward_step(iter([packed]), model)
    with pytest.raises(ValueError, match="host tensors"):
        thd_segments(packed.position_ids.to("meta"), packed.lengths)


def test_the_local_spec_gets_one_causal_mask_for_padded_rows_and_block_masks_for_packed_ones():
    padded = collate([sample(0, 5), sample(1, 3)], SEQ)
    packed = concatenate(packed_rows())
    assert padded.attention_mask().shape == (1, 1, SEQ, SEQ)
    assert torch.equal(padded.attention_mask()[0, 0], ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril())
    # Row 0 packs uid 0 (5 tokens) then uid 2 (3): token 5 starts a sample and sees only itself.
    mask = packed.attention_mask()
    assert mask.shape == (2, 1, SEQ, SEQ)
    assert mask[0, 0, 5].tolist() == [True] * 5 + [False] + [True] * 2
    assert mask[0, 0, 4].tolist() == [False] * 5 + [True] * 3
