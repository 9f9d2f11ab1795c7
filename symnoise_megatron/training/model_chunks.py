"""This rank's model chunks: the model's shape, the layout, megatron's TransformerConfig, the
build, the weights, the device, BF16 and the DDP wrap."""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch
import torch.distributed as dist

from symnoise_megatron.checkpoint.convert import model_config_of
from symnoise_megatron.common.megatron_versions import cuda_graph_regions_field
from symnoise_megatron.checkpoint.load import load_model_weights
from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config, transformer_engine_available
from symnoise_megatron.model.config import ModelConfig, preset
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding import noisy_embeddings
from symnoise_megatron.runtime.cpu import is_cpu_only
from symnoise_megatron.runtime.wgrad_accumulation import provide_wgrad_accumulation_kernel
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
    pp = options.pipeline_model_parallel_size
    vpp = options.num_virtual_stages_per_pipeline_rank
    per_virtual_stage = options.num_layers_per_virtual_pipeline_stage
    if per_virtual_stage:
        # As Megatron-LM: the layers counted with the embedding and loss, when those are.
        counted = (model_config.num_layers + options.account_for_embedding_in_pipeline_split
                   + options.account_for_loss_in_pipeline_split)
        if pp < 2 or counted % (pp * per_virtual_stage):
            raise ValueError(
                f"--num-layers-per-virtual-pipeline-stage {per_virtual_stage}: the model's {counted} layers"
                f"{' (with the embedding and loss counted)' if counted != model_config.num_layers else ''} must split "
                f"into --pipeline-model-parallel-size {pp} (at least 2) stages of whole virtual stages of "
                f"{per_virtual_stage} layers (divisible by {pp} x {per_virtual_stage})")
        vpp = counted // (pp * per_virtual_stage)
    if vpp is not None and pp < 2:
        raise ValueError("--num-virtual-stages-per-pipeline-rank needs --pipeline-model-parallel-size 2 or more")
    parallel = ParallelConfig(
        options.tensor_model_parallel_size, pp, vpp if vpp and vpp > 1 else None, options.sequence_parallel,
        options.context_parallel_size, num_layers_in_first_pipeline_stage=options.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=options.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=options.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=options.account_for_loss_in_pipeline_split)
    chunk_layers = validate_layout(model_config, parallel)
    check_recompute_layers(config.precision, chunk_layers)
    return parallel


def check_recompute_layers(precision, chunk_layers: List[List[int]]) -> None:
    """--recompute-num-layers against the layers of every model chunk: uniform recomputation
    checkpoints groups of that many layers, which must tile each chunk (megatron-core would index
    past the chunk's last layer otherwise)."""
    if precision.recompute_granularity != "full" or (precision.recompute_method or "uniform") != "uniform":
        return
    group = precision.recompute_num_layers or 1
    sizes = sorted({layers for rank in chunk_layers for layers in rank})
    if any(size % group for size in sizes):
        raise ValueError(f"--recompute-num-layers {group} with --recompute-method uniform must divide the layers of "
                         f"every model chunk ({', '.join(map(str, sizes))} here)")


def check_interleaving(parallel: ParallelConfig, microbatches: int, doubled: bool) -> None:
    """megatron-core's interleaved schedule runs a step's micro-batches in groups of PP and refuses
    a count that is no multiple of it (mid-run); refused here before any model is built."""
    pp = parallel.pipeline_model_parallel_size
    if parallel.virtual_pipeline_model_parallel_size and microbatches % pp:
        raise ValueError(
            f"interleaved pipeline stages run a step's micro-batches in groups of --pipeline-model-parallel-size {pp}: "
            f"this step has {microbatches} per data-parallel rank (--global-batch-size / (--micro-batch-size x "
            f"data-parallel size){', doubled by --noise-pairing microbatch' if doubled else ''}); change the batch "
            "sizes, or run without virtual stages")


# Settings megatron-core runs only with Transformer Engine (and so only on a GPU), each refused
# on CPU by its flag.
TE_ONLY_FLAGS = (
    ("--fp8-format", lambda c: c.precision.fp8_format),
    ("--fp8-param-gather", lambda c: c.precision.fp8_param_gather),
    ("--sequence-parallel", lambda c: c.parallelism.sequence_parallel),
    ("--context-parallel-size > 1", lambda c: c.parallelism.context_parallel_size > 1),
    ("--use-precision-aware-optimizer", lambda c: c.performance.use_precision_aware_optimizer),
    ("--cross-entropy-fusion-impl te", lambda c: c.performance.cross_entropy_loss_fusion
     and c.performance.cross_entropy_fusion_impl == "te"),
    # megatron-core 0.16 checkpoints the norms through a function that asks Transformer Engine
    # whether FP8 is on, whatever the layers are.
    ("--recompute-modules layernorm", lambda c: c.precision.recompute_granularity == "selective"
     and "layernorm" in c.precision.recompute_modules),
    # Userbuffers and CUDA graphs are CUDA's (static shapes alone run anywhere).
    ("--tp-comm-overlap", lambda c: c.performance.tp_comm_overlap),
    ("--cuda-graph-impl", lambda c: c.performance.uses_cuda_graphs),
)


def check_transformer_engine_features(config: TrainingConfig) -> None:
    if transformer_engine_available():
        return
    asked = [flag for flag, wanted in TE_ONLY_FLAGS if wanted(config)]
    if asked:
        raise ValueError(f"{', '.join(asked)} {'need' if len(asked) > 1 else 'needs'} Transformer Engine on a GPU "
                         "(megatron-core's local CPU layers have no FP8, no sequence-parallel norms, no "
                         "context-parallel attention, no Transformer Engine optimizer, cross entropy or "
                         "norm checkpointing, no userbuffers and no CUDA graphs)")


def build_transformer_config(config: TrainingConfig, model_config: ModelConfig, parallel: ParallelConfig):
    """megatron-core's TransformerConfig for the precision, recomputation and fusion flags."""
    precision, performance = config.precision, config.performance
    overrides = {
        # Weight gradients straight into the DDP buffer: Transformer Engine's layers do it themselves;
        # megatron-core's own linear layers (the local spec, the output layer) use apex's kernel or,
        # where apex is missing, torch's GEMM (runtime/wgrad_accumulation.py).
        "gradient_accumulation_fusion": performance.gradient_accumulation_fusion,
        # As Megatron-LM: a pipeline stage's output keeps only its autograd graph once sent.
        "deallocate_pipeline_outputs": True,
        "cross_entropy_loss_fusion": performance.cross_entropy_loss_fusion,
        "cross_entropy_fusion_impl": performance.cross_entropy_fusion_impl,
        # Static shapes (training/batches.py) are what these two need; the userbuffers themselves
        # are set up before the model is built (runtime/userbuffers.py).
        "tp_comm_overlap": performance.tp_comm_overlap,
        "cuda_graph_impl": performance.cuda_graph_impl,
        cuda_graph_regions_field(): list(performance.cuda_graph_scope),
        "cuda_graph_warmup_steps": performance.cuda_graph_warmup_steps,
        # The tracker runtime/parallel.py seeds for CUDA graphs (cuda_rng_tracker_options).
        "use_te_rng_tracker": performance.uses_cuda_graphs,
    }
    if precision.fp8_format:
        overrides.update(fp8=precision.fp8_format, fp8_recipe=precision.fp8_recipe, fp8_param=precision.fp8_param_gather)
        if precision.first_last_layers_bf16:
            overrides.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=precision.num_layers_at_start_in_bf16,
                             num_layers_at_end_in_bf16=precision.num_layers_at_end_in_bf16)
    if precision.recompute_granularity:
        overrides.update(recompute_granularity=precision.recompute_granularity)
        if precision.recompute_granularity == "full":
            # megatron-core needs a method and a count; this stack's default is uniform, 1 layer.
            overrides.update(recompute_method=precision.recompute_method or "uniform",
                             recompute_num_layers=precision.recompute_num_layers or 1)
        elif precision.recompute_modules:
            overrides.update(recompute_modules=list(precision.recompute_modules))
    return make_transformer_config(model_config, parallel, params_dtype=precision.params_dtype, **overrides)


def ddp_config(config: TrainingConfig, parallel: ParallelConfig):
    """megatron-core's DistributedDataParallelConfig for the data-parallel flags."""
    from megatron.core.distributed import DistributedDataParallelConfig

    performance = config.performance
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=performance.accumulate_allreduce_grads_in_fp32,
        use_distributed_optimizer=config.parallelism.use_distributed_optimizer,
        overlap_grad_reduce=performance.overlap_grad_reduce,
        overlap_param_gather=performance.overlap_param_gather,
        # As Megatron-LM: all stages start their all-gathers together under interleaving, and
        # each when it needs them otherwise.
        align_param_gather=performance.overlap_param_gather and parallel.virtual_pipeline_model_parallel_size is not None,
        bucket_size=performance.ddp_bucket_size,
        fp8_param_gather=config.precision.fp8_param_gather,
    )


def build_training_chunks(config: TrainingConfig, model_config: ModelConfig, noise: NoiseConfig, transformer_config,
                          parallel: ParallelConfig, device: torch.device, weights_from: Optional[str],
                          mean_sample_length: int, log) -> List:
    """This rank's chunks, initialised from ``config.optimizer.seed`` or loaded from ``weights_from``,
    on ``device`` and wrapped in megatron-core's DDP (whose hooks ``transformer_config`` now holds)."""
    from megatron.core.distributed import DistributedDataParallel

    if transformer_config.gradient_accumulation_fusion and not is_cpu_only():
        # megatron-core's own linear layers refuse to be built with the fusion and no kernel.
        provide_wgrad_accumulation_kernel(log)
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
    data_parallel = ddp_config(config, parallel)
    chunks = [DistributedDataParallel(transformer_config, data_parallel, chunk) for chunk in chunks]
    set_schedule_hooks(transformer_config, chunks, data_parallel)
    return chunks


def set_schedule_hooks(transformer_config, chunks: List, data_parallel) -> None:
    """What megatron-core's pipeline schedules call on the DDP chunks, as Megatron-LM sets it:
    gradient accumulation without sync, the gradients' finalisation, and with the overlap flags
    the start of each chunk's gradient reduction (after its last micro-batch's backward) and, under
    interleaving, of its parameter all-gather."""
    from megatron.core.distributed import finalize_model_grads

    def per_chunk(method):
        bound = [getattr(chunk, method) for chunk in chunks]
        return bound if len(bound) > 1 else bound[0]

    transformer_config.finalize_model_grads_func = finalize_model_grads
    transformer_config.no_sync_func = per_chunk("no_sync")
    if data_parallel.overlap_grad_reduce:
        transformer_config.grad_sync_func = per_chunk("start_grad_sync")
    if data_parallel.overlap_param_gather and data_parallel.align_param_gather:
        transformer_config.param_sync_func = per_chunk("start_param_sync")


def sync_parameters(chunks: List) -> None:
    """With --overlap-param-gather the optimizer step leaves each rank's weights outside its own
    shard stale until the next forward gathers them: gather them now (before a save, a
    validation, or the end of the run). A no-op otherwise."""
    for chunk in chunks:
        if chunk.ddp_config.use_distributed_optimizer and chunk.ddp_config.overlap_param_gather:
            chunk.start_param_sync(force_sync=True)


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
