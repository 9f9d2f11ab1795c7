"""Process groups: megatron-core's parallel state for a layout, and this rank's device."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from symnoise_megatron.model.parallelism import ParallelConfig


def initialize_distributed(parallel: ParallelConfig, backend: Optional[str] = None, seed: int = 1234,
                           timeout_minutes: int = 10, cuda_graphs: bool = False) -> None:
    """Join the job's process group (torchrun's environment) and build megatron's groups.

    ``timeout_minutes`` (Megatron-LM's --distributed-timeout-minutes, default 10 as there):
    how long a collective waits for the slowest rank, for the process group and for every
    group megatron-core builds (whose own default is 30).

    On a GPU this also seeds megatron-core's CUDA RNG tracker (tensor-parallel weight
    init and dropout fork it), as Megatron-LM's initialisation does, with the tracker a CUDA
    graph can capture where ``cuda_graphs`` (``cuda_rng_tracker_options``); on CPU the runtime
    replaces that tracker."""
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    parallel.data_parallel_size(dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed, **cuda_rng_tracker_options(cuda_graphs))


def cuda_rng_tracker_options(cuda_graphs: bool) -> dict:
    """megatron-core's RNG tracker for a run with CUDA graphs, as Megatron-LM picks it: Transformer
    Engine's tracker on graph-safe generators. The default tracker swaps the global generator's
    state at every dropout fork (TE's attention forks it even without dropout), which a capture
    refuses, and megatron-core's own graphs refuse to build on it."""
    return {"te_rng_tracker": cuda_graphs, "use_cudagraphable_rng": cuda_graphs}


def compute_device() -> torch.device:
    """Where this rank's model, batches and collectives live: its GPU under NCCL, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_distributed() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
