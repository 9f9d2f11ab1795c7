"""Gradient-accumulation fusion for megatron-core's own linear layers where apex is missing.

With ``gradient_accumulation_fusion`` each linear layer adds its weight gradient to the DDP
buffer's FP32 ``main_grad`` inside its backward GEMM, instead of materialising ``weight.grad``
and adding it in a second pass over every parameter. Transformer Engine's layers do this
themselves. megatron-core's own ``ColumnParallelLinear``/``RowParallelLinear`` (every linear
layer of the local spec; the output layer of the Transformer Engine spec too) call apex's
``fused_weight_gradient_mlp_cuda`` and refuse to be built without it. :class:`TorchWgradAccumulation`
is that kernel in torch: one GEMM into ``main_grad``, on the host or the GPU.
"""

from __future__ import annotations

import importlib.util

import torch


class TorchWgradAccumulation:
    """apex's ``fused_weight_gradient_mlp_cuda`` interface, in torch."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        if total_input.dtype == main_grad.dtype:
            main_grad.addmm_(grad_output.t(), total_input)
        else:  # BF16 activations, FP32 buffer: rounded as the unfused path rounds weight.grad
            main_grad.add_(grad_output.t().matmul(total_input))

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def apex_kernel_available() -> bool:
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def provide_wgrad_accumulation_kernel(log=None) -> None:
    """On a GPU without apex, hand megatron-core's linear layers :class:`TorchWgradAccumulation`
    for the rest of the process (the training process builds and runs its model under it). The
    CPU runtime does the same for as long as it is entered."""
    from megatron.core.tensor_parallel import layers

    if layers._grad_accum_fusion_available:
        return
    layers.fused_weight_gradient_mlp_cuda = TorchWgradAccumulation
    layers._grad_accum_fusion_available = True
    if log is not None and not apex_kernel_available():
        log("gradient-accumulation fusion: Transformer Engine's layers fuse it; megatron-core's own linear layers "
            "(the output layer) accumulate with torch's GEMM (apex's kernel is not installed)")
