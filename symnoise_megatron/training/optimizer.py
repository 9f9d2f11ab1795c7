"""megatron-core's optimizer, with a fused Adam kernel wherever the machine has one."""

from __future__ import annotations

from contextlib import nullcontext
from unittest import mock

import torch


class TorchFusedAdam(torch.optim.Adam):
    """torch's fused (single-kernel) Adam behind the constructor of apex's ``FusedAdam``.

    megatron-core calls ``Adam(..., adam_w_mode=...)`` when it has Transformer Engine's or
    apex's fused Adam and falls back to torch's per-tensor loop otherwise, which on a CPU
    (and on a GPU image without either) spends about four times as long in the update.
    torch has its own fused kernel for CPU and CUDA since 2.4; this hands it to megatron-core.
    """

    def __init__(self, params, adam_w_mode: bool = True, **kwargs):
        super().__init__(params, fused=True, decoupled_weight_decay=adam_w_mode, **kwargs)


def build_optimizer(optimizer_config, chunks):
    """``get_megatron_optimizer`` over ``chunks``; torch's fused Adam where megatron-core found no fused one."""
    import megatron.core.optimizer as mcore_optimizer
    from megatron.core.optimizer import get_megatron_optimizer

    fused_adam = (
        mock.patch.multiple(mcore_optimizer, Adam=TorchFusedAdam, USING_PYTORCH_OPTIMIZER=False)
        if mcore_optimizer.USING_PYTORCH_OPTIMIZER and optimizer_config.optimizer == "adam"
        else nullcontext()
    )
    with fused_adam:
        return get_megatron_optimizer(optimizer_config, chunks)
