"""megatron-core's optimizer with torch's fused Adam where neither TE nor apex provides one."""

import pytest
import torch

from symnoise_megatron.training.optimizer import TorchFusedAdam
from tests.distributed import run_distributed


@pytest.mark.parametrize("adam_w_mode, reference", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_fused_adam_takes_the_same_steps_as_torchs_loop(adam_w_mode, reference):
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    fused_params = [torch.nn.Parameter(p.clone()) for p in start]
    loop_params = [torch.nn.Parameter(p.clone()) for p in start]
    settings = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    fused = TorchFusedAdam(fused_params, adam_w_mode=adam_w_mode, **settings)
    loop = reference(loop_params, foreach=False, **settings)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in start]
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()
    for ours, theirs in zip(fused_params, loop_params):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    moved = max(float((p - s).abs().max()) for p, s in zip(fused_params, start))
    assert moved > 1e-2  # five steps at lr 1e-2 moved the weights: the comparison is not between two no-ops


def optimizer_megatron_builds():
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed
    from symnoise_megatron.training.optimizer import build_optimizer

    parallel = ParallelConfig()
    initialize_distributed(parallel)
    model_config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                               vocab_size=64, max_position_embeddings=8)
    config = make_transformer_config(model_config, parallel)
    chunk = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                    build_gpt_model(model_config, NoiseConfig("none"), config))
    optimizer = build_optimizer(OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1), [chunk])
    inner = optimizer.optimizer
    return type(inner).__name__, [group["fused"] for group in inner.param_groups], [
        group["decoupled_weight_decay"] for group in inner.param_groups]


@pytest.mark.distributed
def test_megatron_core_gets_the_fused_adam_without_te_or_apex():
    name, fused, decoupled = run_distributed(optimizer_megatron_builds, 1)[0]
    assert name == "TorchFusedAdam" and all(fused) and all(decoupled)
