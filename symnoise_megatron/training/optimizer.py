"""megatron-core's optimizer and learning-rate schedule, with a fused Adam kernel wherever the machine has one."""

from __future__ import annotations

import math
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


def optimizer_config(config):
    """megatron-core's OptimizerConfig for the flags (``config``: a TrainingConfig)."""
    from megatron.core.optimizer import OptimizerConfig

    options, precision = config.optimizer, config.precision
    return OptimizerConfig(
        optimizer="adam", lr=options.lr, min_lr=options.min_lr, weight_decay=options.weight_decay,
        adam_beta1=options.adam_beta1, adam_beta2=options.adam_beta2, clip_grad=options.clip_grad,
        bf16=precision.bf16, params_dtype=precision.params_dtype,
        use_distributed_optimizer=config.parallelism.use_distributed_optimizer,
        use_precision_aware_optimizer=config.performance.use_precision_aware_optimizer,
        overlap_param_gather=config.performance.overlap_param_gather,
        # The distributed optimizer handles FP8 weights by recipe (delayed scaling casts in its Adam kernel).
        fp8_recipe=precision.fp8_recipe if precision.fp8_format else None,
    )


def build_optimizer_and_scheduler(config, chunks, train_iters: int):
    """Adam (or its distributed form) over ``chunks`` and Megatron-LM's learning-rate and
    weight-decay schedule over ``train_iters`` iterations. ``config``: a TrainingConfig."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    options = config.optimizer
    optimizer = build_optimizer(optimizer_config(config), chunks)
    warmup = int(options.lr_warmup_fraction * train_iters)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=options.lr, min_lr=options.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=train_iters, lr_decay_style=options.lr_decay_style, start_wd=options.weight_decay,
        end_wd=options.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant",
        override_opt_param_scheduler=options.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=options.use_checkpoint_opt_param_scheduler,
    )
    return optimizer, scheduler


def train_iterations(config, train_samples: int) -> int:
    """--train-iters, or the iterations of --train-epochs over ``train_samples``."""
    options = config.optimizer
    return options.train_iters or math.ceil(options.train_epochs * train_samples / options.global_batch_size)
