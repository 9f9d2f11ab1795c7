"""The TransformerConfig the builder makes for a GPU, checked on CPU (CUDA reported present)."""

from unittest import mock

import pytest

from symnoise_megatron.model import builder
from symnoise_megatron.model.config import preset
from symnoise_megatron.model.parallelism import ParallelConfig


@pytest.mark.parametrize("name, fused", [("opt-6.7b", False), ("llama2-7b", True)])
def test_gpu_config_builds_for_every_architecture(name, fused):
    # OPT's ReLU has no fused bias-activation kernel in megatron-core, which refuses the flag
    # for it; LLaMA's SwiGLU has one (bias-free too).
    with mock.patch.object(builder.torch.cuda, "is_available", return_value=True):
        config = builder.make_transformer_config(preset(name, num_layers=2), ParallelConfig())
    assert config.bias_activation_fusion is fused
    assert config.bias_dropout_fusion and not config.use_cpu_initialization
