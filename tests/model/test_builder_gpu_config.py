"""The TransformerConfig the builder makes for a GPU, checked on CPU (CUDA reported present)."""

from unittest import mock

import pytest
import torch

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


def gpu_config(pp, vpp, **overrides):
    model = preset("llama2-7b", num_layers=8)
    with mock.patch.object(builder.torch.cuda, "is_available", return_value=True):
        return builder.make_transformer_config(model, ParallelConfig(pipeline_model_parallel_size=pp,
                                                                     virtual_pipeline_model_parallel_size=vpp), **overrides)


def test_interleaved_stages_at_pp2_are_refused_on_gpus_as_megatron_lm_refuses_them():
    """Issue 24: batched p2p posts an activation and a gradient of one shape to the same peer."""
    with pytest.raises(ValueError) as error:
        gpu_config(2, 2)
    message = str(error.value)
    assert message.startswith("Interleaved pipeline stages (--num-virtual-stages-per-pipeline-rank or "
                              "--num-layers-per-virtual-pipeline-stage) with --pipeline-model-parallel-size 2 are refused")
    assert "multiple p2p sends and recvs between same 2 ranks per communication batch" in message
    assert gpu_config(4, 2).batch_p2p_comm and gpu_config(2, None).batch_p2p_comm  # the layouts it allows
    unbatched = builder.make_transformer_config(preset("tiny", num_layers=4), ParallelConfig(
        pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2))  # the CPU: unbatched, in order
    assert not unbatched.batch_p2p_comm


def local_norms():
    """The norm classes of a local-spec model built while megatron-core's block default is a stand-in
    for TE's norm (what it is wherever TE is installed)."""
    from megatron.core.transformer import transformer_block

    from symnoise_megatron.model.parallelism import ParallelConfig as Layout
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    class StandInTENorm(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    initialize_distributed(Layout())
    model = preset("tiny")
    with mock.patch.object(transformer_block, "LayerNormImpl", StandInTENorm):
        chunk = builder.build_gpt_model(model, NoiseConfig("none"), builder.make_transformer_config(model, Layout()),
                                        use_transformer_engine=False)
    return {type(m).__name__ for m in chunk.modules() if "Norm" in type(m).__name__}, len(chunk.decoder.layers)


@pytest.mark.distributed
def test_the_local_spec_is_purely_local():
    """Issue 24: te_parity's 'local' model took TE's norm after its last layer once TE was installed."""
    from tests.distributed import run_distributed

    norms, layers = run_distributed(local_norms, 1)[0]
    assert norms == {"RMSNorm"} and layers == 2  # torch's norm (WrappedTorchNorm) everywhere, the stand-in nowhere
