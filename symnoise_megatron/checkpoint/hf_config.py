"""Hugging Face config.json <-> ModelConfig, with clear refusals for what is not supported."""

from __future__ import annotations

import copy
from typing import Optional

from symnoise_megatron.model.config import ModelConfig


class UnsupportedCheckpoint(ValueError):
    pass


def _rope(config: dict):
    """(theta, llama3 scaling or None) from either transformers 4 or 5 style fields."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    source = parameters if parameters.get("rope_type", "default") != "default" else scaling
    rope_type = source.get("rope_type", source.get("type", "default")) if source else "default"
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedCheckpoint(f"rope scaling type {rope_type!r} is not supported (supported: llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return float(theta), {key: source[key] for key in keys}


def model_config_from_hf(config: dict) -> ModelConfig:
    """The ModelConfig of a Hugging Face LLaMA or OPT config.json."""
    model_type = config.get("model_type")
    if model_type == "llama":
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise UnsupportedCheckpoint("LLaMA checkpoints with attention or MLP biases are not supported")
        if config.get("head_dim") not in (None, hidden // heads):
            raise UnsupportedCheckpoint(f"head_dim {config['head_dim']} != hidden_size / num_attention_heads is not supported")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedCheckpoint(f"LLaMA hidden_act {config['hidden_act']!r} is not supported (silu)")
        theta, scaling = _rope(config)
        return ModelConfig(
            architecture="llama", num_layers=config["num_hidden_layers"], hidden_size=hidden,
            num_attention_heads=heads, num_query_groups=config.get("num_key_value_heads") or heads,
            ffn_hidden_size=config["intermediate_size"], vocab_size=config["vocab_size"],
            max_position_embeddings=config.get("max_position_embeddings", 2048), rotary_base=theta,
            rope_scaling=scaling, norm_epsilon=config.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            init_method_std=config.get("initializer_range", 0.02),
        )
    if model_type == "opt":
        problems = []
        if config.get("word_embed_proj_dim", config["hidden_size"]) != config["hidden_size"]:
            problems.append("word_embed_proj_dim != hidden_size (project_in/out, as OPT-350m)")
        if not config.get("do_layer_norm_before", True):
            problems.append("post-layer-norm (do_layer_norm_before=false)")
        if config.get("_remove_final_layer_norm", False):
            problems.append("no final layer norm")
        if config.get("activation_function", "relu") != "relu":
            problems.append(f"activation {config['activation_function']!r}")
        if not config.get("enable_bias", True) or not config.get("layer_norm_elementwise_affine", True):
            problems.append("bias-free layers or norms")
        if problems:
            raise UnsupportedCheckpoint("unsupported OPT variant: " + "; ".join(problems))
        return ModelConfig(
            architecture="opt", num_layers=config["num_hidden_layers"], hidden_size=config["hidden_size"],
            num_attention_heads=config["num_attention_heads"], ffn_hidden_size=config["ffn_dim"],
            vocab_size=config["vocab_size"], max_position_embeddings=config["max_position_embeddings"],
            norm_epsilon=1e-5, tie_word_embeddings=True, init_method_std=config.get("init_std", 0.02),
        )
    raise UnsupportedCheckpoint(
        f"unsupported architecture {config.get('architectures') or model_type!r}: "
        "LLaMA (model_type llama) and OPT (model_type opt) are supported"
    )


def hf_config_from_model(model: ModelConfig, original: Optional[dict] = None) -> dict:
    """config.json for ``model``: the original one when the conversion kept it (so every
    field transformers and vLLM read survives), else one written from the shape."""
    if original is not None:
        config = copy.deepcopy(original)
        if model_config_from_hf(config) != model:
            raise ValueError("the stored Hugging Face config does not describe this checkpoint's model")
        return config
    return HF_CONFIG_WRITERS[model.hf_model_type](model)


def _llama_hf_config(model: ModelConfig) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.query_groups, "vocab_size": model.vocab_size,
        "max_position_embeddings": model.max_position_embeddings, "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rotary_base, "tie_word_embeddings": model.tie_word_embeddings,
        "hidden_act": model.traits.activation, "attention_bias": model.traits.linear_biases, "mlp_bias": model.traits.linear_biases,
        "initializer_range": model.init_method_std, "bos_token_id": 1, "eos_token_id": 2,
    }
    if model.rope_scaling:
        config["rope_scaling"] = {"rope_type": "llama3", **model.rope_scaling}
    return config


def _opt_hf_config(model: ModelConfig) -> dict:
    return {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": model.hidden_size,
        "word_embed_proj_dim": model.hidden_size, "ffn_dim": model.ffn_hidden_size,
        "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
        "vocab_size": model.vocab_size, "max_position_embeddings": model.max_position_embeddings,
        "do_layer_norm_before": True, "activation_function": model.traits.activation, "enable_bias": model.traits.linear_biases,
        "layer_norm_elementwise_affine": True, "tie_word_embeddings": True, "init_std": model.init_method_std,
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
    }


# config.json writers by Hugging Face model type (ModelConfig.hf_model_type).
HF_CONFIG_WRITERS = {"llama": _llama_hf_config, "opt": _opt_hf_config}
