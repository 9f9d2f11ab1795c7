"""This rank's model chunks: the model's shape, the layout, megatron's TransformerConfig, the
build, the weights, the device, BF16 and the DDP wrap."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.distributed as dist

from symnoise_megatron.checkpoint.convert import model_config_of
from symnoise_megatron.checkpoint.load import load_model_weights
from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config, transformer_engine_available
from symnoise_megatron.model.config import ModelConfig, preset
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding import noisy_embeddings
from symnoise_megatron.runtime.cpu import is_cpu_only
from symnoise_megatron.training.arguments import TrainingConfig


def resolve_model_config(config: TrainingConfig, vocab_size: int) -> ModelConfig:
    """The shape of the model: the checkpoint's with --load, else the preset sized for the data."""
    options = config.model
    if options.load:
        model_config = model_config_of(options.load)
        if model_config.vocab_size < vocab_size:
            raise ValueError(f"--load {options.load}: its vocabulary ({model_config.vocab_size}) is smaller than the "
                             f"data's tokenizer ({vocab_size})")
        return model_config
    base = preset(options.model)
    return dataclasses.replace(base, vocab_size=vocab_size, num_layers=options.num_layers or base.num_layers,
                               max_position_embeddings=max(base.max_position_embeddings, config.data.seq_length))


def parallel_layout(config: TrainingConfig, model_config: ModelConfig) -> ParallelConfig:
    """The layout of the flags, checked against the model (and the model against --seq-length)."""
    if config.data.seq_length > model_config.max_position_embeddings:
        raise ValueError(f"--seq-length {config.data.seq_length} exceeds the model's "
                         f"{model_config.max_position_embeddings} positions")
    options = config.parallelism
    vpp = None
    per_virtual_stage = options.num_layers_per_virtual_pipeline_stage
    if per_virtual_stage:
        pp = options.pipeline_model_parallel_size
        if pp < 2 or model_config.num_layers % (pp * per_virtual_stage):
            raise ValueError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual_stage}: the model's {model_config.num_layers} "
                f"layers must split into --pipeline-model-parallel-size {pp} (at least 2) stages of whole virtual stages "
                f"of {per_virtual_stage} layers (num_layers divisible by {pp} x {per_virtual_stage})")
        vpp = model_config.num_layers // (pp * per_virtual_stage)
    parallel = ParallelConfig(options.tensor_model_parallel_size, options.pipeline_model_parallel_size, vpp,
                              options.sequence_parallel, options.context_parallel_size)
    validate_layout(model_config, parallel)
    return parallel


def check_transformer_engine_features(config: TrainingConfig) -> None:
    if transformer_engine_available():
        return
    needs_te = {"--fp8-format": config.precision.fp8_format, "--sequence-parallel": config.parallelism.sequence_parallel,
                "--context-parallel-size > 1": config.parallelism.context_parallel_size > 1}
    asked = [flag for flag, value in needs_te.items() if value]
    if asked:
        raise ValueError(f"{', '.join(asked)} {'need' if len(asked) > 1 else 'needs'} Transformer Engine on a GPU (megatron-core's local "
                         "CPU layers have no FP8, no sequence-parallel norms and no context-parallel attention)")


def build_transformer_config(config: TrainingConfig, model_config: ModelConfig, parallel: ParallelConfig):
    """megatron-core's TransformerConfig for the precision and recomputation flags."""
    precision = config.precision
    # Weight gradients straight into the DDP buffer: the CPU runtime provides the kernel
    # (apex's is CUDA-only and not a dependency on GPU).
    overrides = {"gradient_accumulation_fusion": is_cpu_only()}
    if precision.fp8_format:
        overrides.update(fp8=precision.fp8_format, fp8_recipe=precision.fp8_recipe)
        if precision.first_last_layers_bf16:
            overrides.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
                             num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16)
    if precision.recompute_granularity:
        overrides.update(recompute_granularity=precision.recompute_granularity)
        if precision.recompute_granularity == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
    return make_transformer_config(model_config, parallel, params_dtype=precision.params_dtype, **overrides)


def build_training_chunks(config: TrainingConfig, model_config: ModelConfig, noise: NoiseConfig, transformer_config,
                          device: torch.device, weights_from: Optional[str], mean_sample_length: int, log) -> List:
    """This rank's chunks, initialised from ``config.optimizer.seed`` or loaded from ``weights_from``,
    on ``device`` and wrapped in megatron-core's DDP (whose hooks ``transformer_config`` now holds)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    torch.manual_seed(config.optimizer.seed)
    chunks = build_model_chunks(model_config, noise, transformer_config,
                                make_vocab_size_divisible_by=config.model.make_vocab_size_divisible_by)
    if weights_from:
        load_model_weights(chunks, weights_from)
        log(f"loaded weights from {weights_from} (fine-tuning from iteration 0)")
    if config.precision.fp8_format and noise.enabled and not config.precision.first_last_layers_bf16:
        warn_if_fp8_swallows_noise(chunks, config, mean_sample_length, log)
    # As Megatron-LM's get_model: layers megatron-core builds on the host (the local spec's
    # torch norms) join the rest on this rank's GPU.
    chunks = [chunk.to(device) for chunk in chunks]
    if config.precision.bf16:
        # As Megatron-LM: parameters megatron-core leaves in FP32 (the local spec's torch
        # norms) go to BF16 too, so the mixed-precision optimizer and its checkpoint see one dtype.
        from megatron.core.transformer.module import Float16Module

        chunks = [Float16Module(transformer_config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=config.parallelism.use_distributed_optimizer)
    chunks = [DistributedDataParallel(transformer_config, ddp_config, chunk) for chunk in chunks]
    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return chunks


def warn_if_fp8_swallows_noise(chunks, config: TrainingConfig, mean_sample_length: int, log) -> None:
    """Warn when FP8 would swallow the noise at the first layer's inputs (issue-7 analysis,
    on this model's own embedding rows at the data's mean sample length)."""
    from symnoise_megatron.noise.fp8_resolution import check_first_layer

    embeddings = [e for chunk in chunks for e in noisy_embeddings(chunk)]
    if not embeddings or dist.get_rank() != 0:
        return
    warning = check_first_layer(embeddings[0].weight, config.noise.noise_alpha, mean_sample_length,
                                config.precision.fp8_recipe)
    if warning:
        log("WARNING: " + warning)
