"""CUDA graphs of the transformer layers (--cuda-graph-impl), as Megatron-LM's training loop
drives them.

``local``: megatron-core records each layer's graphs during the first steps and its pipeline
schedule creates them itself; nothing to do here. ``transformer_engine``: after
--cuda-graph-warmup-steps iterations of this process, megatron-core's ``TECudaGraphHelper``
captures one graph per layer (per micro-batch of a step under pipeline parallelism) with TE's
``make_graphed_callables``; with the distributed optimizer's overlapped parameter gather, the
modules' forward pre-hooks are off during the capture and become manual hooks the graphs call.
The graphs replay on static inputs, so every micro-batch must have one shape (static shapes) and
the step one micro-batch count: megatron-core reads it from its micro-batch calculator, set here.
"""

from __future__ import annotations

from typing import List


class CudaGraphCapture:
    """``config``: the run's TrainingConfig; ``chunks``: the DDP model chunks; ``seq_length``,
    ``rows``: the shape the schedule runs (``forward_step.schedule_shape``); ``microbatches``: a
    step's micro-batch count on this rank."""

    def __init__(self, config, transformer_config, chunks: List, optimizer, seq_length: int, rows: int,
                 microbatches: int, data_parallel_size: int, helper_class=None):
        self.warmup_steps = config.performance.cuda_graph_warmup_steps
        self.enabled = config.performance.cuda_graph_impl == "transformer_engine"
        self.chunks = chunks
        self.hooks_off = config.parallelism.use_distributed_optimizer and config.performance.overlap_param_gather
        self.steps_run = 0
        self.helper = None
        if not self.enabled:
            return
        from megatron.core.num_microbatches_calculator import (
            init_num_microbatches_calculator, unset_num_microbatches_calculator,
        )

        import torch.distributed as dist

        if helper_class is None:
            from megatron.core.transformer.cuda_graphs import TECudaGraphHelper as helper_class
        # megatron-core's count of a step's micro-batches (TE captures one graph per micro-batch in flight).
        unset_num_microbatches_calculator()  # a run before this one in the process set it
        init_num_microbatches_calculator(dist.get_rank() if dist.is_initialized() else 0, None,
                                         microbatches * rows * data_parallel_size, rows, data_parallel_size)
        self.helper = helper_class(model=chunks, config=transformer_config, seq_length=seq_length,
                                   micro_batch_size=rows, optimizers=[optimizer])

    def before_step(self, settle=None) -> None:
        """Capture at the first step after the warm-up steps (once). ``settle``: called first, to
        finish the host work in flight in other threads (a capture fails on their CUDA calls,
        such as the prefetcher's pinned allocations)."""
        if self.enabled and self.steps_run == self.warmup_steps and not self.helper.graphs_created():
            if settle is not None:
                settle()
            if self.hooks_off and self.steps_run:
                for chunk in self.chunks:
                    chunk.disable_forward_pre_hook(param_sync=False)
            self.helper.create_cudagraphs()
            if self.hooks_off and self.steps_run:
                for chunk in self.chunks:
                    chunk.enable_forward_pre_hook()
                self.helper.cuda_graph_set_manual_hooks()
        self.steps_run += 1
