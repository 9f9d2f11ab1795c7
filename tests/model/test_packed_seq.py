"""Packed rows as Transformer Engine's thd sequences, and the forward step that hands them over."""

import numpy as np
import pytest
import torch

from symnoise_megatron.data.microbatch import concatenate
from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.model.packed_seq import packed_seq_params, thd_loss_positions, thd_segments
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
    mb = concatenate(packed_rows())
    params = packed_seq_params(mb.position_ids, mb.lengths)
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
    packed = concatenate(packed_rows()).doubled()
    padded = collate([sample(0, 5), sample(1, 3)], SEQ)
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
    # Without packing TE's causal attention is exact on padded rows: no thd.
    assert "packed_seq_params" not in te_padded and te_padded["tokens"].shape == (2, SEQ)
    (local_packed,) = local.calls
    assert "packed_seq_params" not in local_packed and local_packed["tokens"].shape == (4, SEQ)
    assert torch.equal(local_packed["attention_mask"], packed.attention_mask)
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
