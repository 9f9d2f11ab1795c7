"""Transformer Engine's userbuffers for --tp-comm-overlap (megatron-core's ``tp_comm_overlap``).

TE overlaps sequence parallelism's all-gathers and reduce-scatters with the GEMMs next to them
through buffers registered once, at start-up, for one shape: ``[tokens of a micro-batch, hidden]``.
Every micro-batch must then have exactly that many tokens, which is what static shapes give
(rows of --seq-length). Set up before the model is built, as Megatron-LM's
``_initialize_tp_communicators`` does; GPU and Transformer Engine only (refused on CPU at start).
"""

from __future__ import annotations

from typing import List

import torch


def userbuffer_shape(seq_length: int, rows_per_microbatch: int, hidden_size: int, context_parallel_size: int = 1):
    """``[tokens, hidden]`` of one micro-batch as the schedule runs it: --seq-length x its rows (a
    ``concat`` pair doubles them; packed rows on the thd path are the same tokens laid end to end),
    split over context-parallel ranks."""
    return [seq_length * rows_per_microbatch // context_parallel_size, hidden_size]


def userbuffer_modes(fp8: bool, bf16_layers: bool) -> List[str]:
    """The quantization modes (Transformer Engine's ``UserBufferQuantizationMode`` values) to
    register buffers for: each GEMM asks for the buffers of its own precision, so FP8 runs that
    keep layers in BF16 (--first-last-layers-bf16) need both, as Megatron-LM registers them."""
    return ["fp8" if fp8 else "none"] + (["none"] if fp8 and bf16_layers else [])


def initialize_tp_comm_overlap(shape, tensor_model_parallel_size: int, modes: List[str], dtype: torch.dtype,
                               bootstrap_backend: str = "nccl") -> None:
    """``dtype``: the buffers' type outside FP8, the run's parameter type (TE's default is BF16)."""
    from transformer_engine.pytorch import module as te_module

    mode = te_module.base.UserBufferQuantizationMode
    te_module.base.initialize_ub(shape=list(shape), tp_size=tensor_model_parallel_size,
                                 quantization_modes=[mode(m) for m in modes], dtype=dtype, ub_cfgs={},
                                 bootstrap_backend=bootstrap_backend)
