"""Build megatron-core ``GPTModel`` chunks with the noisy embedding in place."""

from __future__ import annotations

import importlib.util
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from symnoise_megatron.model.config import ModelConfig, padded_vocab_size
from symnoise_megatron.model.loss_tokens import GPTModelForSFT
from symnoise_megatron.model.parallelism import ParallelConfig
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding import NoisyVocabParallelEmbedding

# ArchitectureTraits.activation (Hugging Face's name) -> the function megatron-core's MLP calls.
ACTIVATIONS = {"silu": F.silu, "relu": F.relu}


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def make_transformer_config(
    model: ModelConfig,
    parallel: ParallelConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    **overrides,
) -> TransformerConfig:
    """megatron-core's TransformerConfig for ``model`` under ``parallel``.

    ``overrides`` are TransformerConfig fields (``fp8``, ``fp8_recipe``,
    ``recompute_granularity``, ...) passed through unchanged.
    """
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.query_groups,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization=model.traits.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.traits.gated_linear_unit,
        activation_func=ACTIVATIONS[model.traits.activation],
        add_bias_linear=model.traits.linear_biases,
        add_qkv_bias=model.traits.linear_biases,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
        account_for_embedding_in_pipeline_split=parallel.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=parallel.account_for_loss_in_pipeline_split,
        sequence_parallel=parallel.sequence_parallel and parallel.tensor_model_parallel_size > 1,
        context_parallel_size=parallel.context_parallel_size,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        attention_softmax_in_fp32=True,
        # The loss is averaged over the loss tokens of the whole global batch.
        calculate_per_token_loss=True,
        use_cpu_initialization=not on_gpu,
        # megatron-core fuses only gelu and swiglu (LLaMA's SiLU GLU, bias or none); OPT's ReLU
        # with the flag set is refused by TransformerConfig.
        bias_activation_fusion=on_gpu and model.traits.gated_linear_unit and model.traits.activation == "silu",
        bias_dropout_fusion=on_gpu,
        # The local spec's fused softmax needs Megatron-LM's compiled kernels (not in the wheel);
        # without them megatron-core would import them anyway on the first attention.
        masked_softmax_fusion=on_gpu and importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,
        # TE's fused rope kernel; megatron-core's unfused rope on packed (thd) rows syncs the
        # host twice per layer (it splits the tokens by the cumulative lengths in Python).
        apply_rope_fusion=transformer_engine_available(),
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        # gloo matches a pair of ranks' messages in posting order; batched p2p posts them in
        # an order that swaps activations and gradients when a rank's previous and next
        # stage are the same peer (interleaved PP 2). On GPUs NCCL batches them, and
        # interleaved PP 2 is refused below (check_p2p_exchange).
        batch_p2p_comm=on_gpu,
    )
    fields.update(overrides)
    check_p2p_exchange(fields)
    with warnings.catch_warnings():
        # megatron-core 0.16 warns about its own default cuda_graph_scope.
        warnings.filterwarnings("ignore", message="full scope is deprecated")
        return TransformerConfig(**fields)


def check_p2p_exchange(fields: dict) -> None:
    """Refuse interleaved pipeline stages at PP 2 with batched p2p (GPUs), as Megatron-LM does.

    There a rank's previous and next stage are the same peer, and the interleaved schedule posts
    an activation and a gradient of the same shape to it in one batch: a swap would neither fail
    nor hang. Megatron-LM accepts the combination only with p2p overlap, which this stack does
    not run; unbatched p2p (the CPU's) keeps the messages in posting order."""
    interleaved = fields.get("virtual_pipeline_model_parallel_size") is not None
    if interleaved and fields["pipeline_model_parallel_size"] == 2 and fields["batch_p2p_comm"] \
            and not fields.get("overlap_p2p_comm"):
        raise ValueError(
            "Interleaved pipeline stages (--num-virtual-stages-per-pipeline-rank or --num-layers-per-virtual-pipeline-"
            "stage) with --pipeline-model-parallel-size 2 are refused on GPUs: a rank's "
            "previous and next stage are the same peer, and Megatron-LM refuses it too ('pipeline-model-parallel size "
            "should be greater than 2 to avoid having multiple p2p sends and recvs between same 2 ranks per "
            "communication batch'); use --pipeline-model-parallel-size 4 or more, or no interleaving")


def layer_spec(model: ModelConfig, use_transformer_engine: bool, config: TransformerConfig, vp_stage: Optional[int] = None):
    """This chunk's layers: Transformer Engine's spec, or megatron-core's local spec with the
    local norm after the last layer too (megatron-core's block default is TE's norm whenever TE
    is installed, which would leave a local-spec model partly TE)."""
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    local = get_gpt_layer_local_spec(normalization=model.traits.normalization)
    return TransformerBlockSubmodules(layer_specs=[local] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=local.submodules.input_layernorm)


def _apply_rope_scaling(gpt: GPTModel, model: ModelConfig) -> None:
    """LLaMA-3.1 rope scaling with every parameter from config.json, not only the factor."""
    if model.rope_scaling is None or not hasattr(gpt, "rotary_pos_emb"):
        return
    rotary = gpt.rotary_pos_emb
    dim = model.head_dim
    inv_freq = 1.0 / (
        model.rotary_base
        ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rotary.inv_freq.device) / dim)
    )
    scaling = model.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        inv_freq,
        factor=scaling["factor"],
        low_freq_factor=scaling.get("low_freq_factor", 1.0),
        high_freq_factor=scaling.get("high_freq_factor", 4.0),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings", 8192),
    )


def build_gpt_model(
    model: ModelConfig,
    noise: NoiseConfig,
    config: TransformerConfig,
    *,
    make_vocab_size_divisible_by: int = 128,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    use_transformer_engine: Optional[bool] = None,
) -> GPTModel:
    """One ``GPTModel`` chunk of this rank with :class:`NoisyVocabParallelEmbedding` in place
    (a :class:`GPTModelForSFT`, whose training loss computes logits at loss tokens only).

    ``pre_process``/``post_process`` default to whether this rank (and ``vp_stage``) holds
    the first/last pipeline stage. The Transformer Engine spec is used when TE and a GPU are
    present (override with ``use_transformer_engine``), megatron-core's local spec otherwise.
    """
    if use_transformer_engine is None:
        use_transformer_engine = transformer_engine_available()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    gpt = GPTModelForSFT(
        config=config,
        transformer_layer_spec=layer_spec(model, use_transformer_engine, config, vp_stage),
        vocab_size=padded_vocab_size(
            model.vocab_size, make_vocab_size_divisible_by, config.tensor_model_parallel_size
        ),
        unpadded_vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type=model.traits.position_embedding_type,
        rotary_base=model.rotary_base,
        vp_stage=vp_stage,
    )
    _apply_rope_scaling(gpt, model)
    # TE's fused attention ignores the dense block-diagonal mask: the forward step hands packed
    # rows to this chunk as cumulative lengths (thd) instead.
    gpt.packed_rows_in_thd = use_transformer_engine
    if pre_process:
        gpt.embedding.word_embeddings = NoisyVocabParallelEmbedding.replacing(
            gpt.embedding.word_embeddings, noise, config
        )
    return gpt


def built_with_transformer_engine(chunk: torch.nn.Module) -> bool:
    """Whether ``chunk`` (or the model chunk it wraps) has Transformer Engine's layers: its
    attention reads no dense mask (causal by itself, cumulative lengths for packed rows)."""
    return any(getattr(module, "packed_rows_in_thd", False) for module in chunk.modules())


def build_model_chunks(
    model: ModelConfig, noise: NoiseConfig, config: TransformerConfig, **kwargs
) -> List[GPTModel]:
    """This rank's model chunks: one, or one per virtual stage with interleaving."""
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [build_gpt_model(model, noise, config, **kwargs)]
    return [build_gpt_model(model, noise, config, vp_stage=stage, **kwargs) for stage in range(vpp)]
