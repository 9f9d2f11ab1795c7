"""Transformer Engine's userbuffers for --tp-comm-overlap (megatron-core's ``tp_comm_overlap``).

TE overlaps sequence parallelism's all-gathers and reduce-scatters with the GEMMs next to them
through buffers registered once, at start-up, for one shape: ``[tokens of a micro-batch, hidden]``.
Every micro-batch must then have exactly that many tokens, which is what static shapes give
(rows of --seq-length). Set up before the model is built, as Megatron-LM's
``_initialize_tp_communicators`` does; GPU and Transformer Engine only (refused on CPU at start).
"""

from __future__ import annotations


def userbuffer_shape(seq_length: int, rows_per_microbatch: int, hidden_size: int, context_parallel_size: int = 1):
    """``[tokens, hidden]`` of one micro-batch as the schedule runs it: --seq-length x its rows (a
    ``concat`` pair doubles them; packed rows on the thd path are the same tokens laid end to end),
    split over context-parallel ranks."""
    return [seq_length * rows_per_microbatch // context_parallel_size, hidden_size]


def initialize_tp_comm_overlap(shape, tensor_model_parallel_size: int, fp8: bool, bootstrap_backend: str = "nccl") -> None:
    from transformer_engine.pytorch import module as te_module

    te_module.base.initialize_ub(shape=list(shape), tp_size=tensor_model_parallel_size, use_fp8=fp8, ub_cfgs={},
                                 bootstrap_backend=bootstrap_backend)
