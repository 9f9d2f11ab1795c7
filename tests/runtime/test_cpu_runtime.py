"""The CPU runtime: CUDA placements go to CPU inside it, nothing leaks out, GPU jobs refuse it."""

from unittest import mock

import pytest
import torch

from symnoise_megatron.model.parallelism import ParallelConfig
from symnoise_megatron.runtime.cpu import cpu_runtime


def test_cuda_placements_become_cpu_inside_only():
    with cpu_runtime():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(3, device=torch.device("cuda", 0)).device.type == "cpu"
        assert torch.ones(2).cuda().device.type == "cpu"
        assert torch.ones(2).to("cuda").device.type == "cpu"
        assert torch.arange(4, device=torch.cuda.current_device()).device.type == "cpu"
        torch.cuda.synchronize()
        assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type(torch.float64).dtype == torch.float64
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            torch.nn.functional.dropout(torch.ones(4), 0.5)
    assert torch.ones(1).type() == "torch.FloatTensor"
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(2, device="cuda")


def test_refuses_to_run_where_cuda_is_available():
    with mock.patch("torch.cuda.is_available", return_value=True):
        with pytest.raises(RuntimeError, match="GPU path"):
            with cpu_runtime():
                pass


def test_parallel_layout_must_divide_world():
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.data_parallel_size(8) == 2
    with pytest.raises(ValueError, match="not divisible by TP x PP x CP"):
        layout.data_parallel_size(6)
