"""Where each Hugging Face tensor goes in a megatron-core checkpoint, and back.

Megatron-core's distributed checkpoint stores every tensor in its tensor-parallel-1 layout,
transformer layers stacked along a leading layer axis (key ``decoder.layers.<name>``). One
table per architecture lists each megatron key, the HF tensors it comes from and the
transform between them; both conversion directions read the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from symnoise_megatron.model.config import ModelConfig

# OPT's learned position table starts with rows no position uses (ArchitectureTraits.unused_position_rows).
# Megatron's position table has no room for them: they are kept beside the tokenizer in
# ``hf_assets/`` (which training copies into its --save), so the way back is bit-exact.
OPT_UNUSED_POSITIONS_FILE = "opt_unused_position_rows.safetensors"
OPT_UNUSED_POSITIONS_KEY = "model.decoder.embed_positions.weight[:2]"
LAYER_PREFIX = "decoder.layers."


@dataclass(frozen=True)
class Entry:
    megatron: str             # checkpoint key (layer keys without the ``decoder.layers.`` prefix)
    hf: Tuple[str, ...]       # HF names; ``{i}`` is the layer index
    transform: str = "copy"   # copy | qkv | gated | vocab | positions


def _qkv_split(model: ModelConfig):
    heads_per_group = model.num_attention_heads // model.query_groups
    return model.query_groups, heads_per_group * model.head_dim, model.head_dim


def _to_megatron_qkv(model: ModelConfig, q, k, v):
    groups, q_rows, kv_rows = _qkv_split(model)
    tail = q.shape[1:]
    # Per query group: its query heads, then its key head, then its value head.
    return torch.cat(
        [q.reshape(groups, q_rows, *tail), k.reshape(groups, kv_rows, *tail), v.reshape(groups, kv_rows, *tail)], dim=1
    ).reshape(-1, *tail)


def _to_hf_qkv(model: ModelConfig, qkv):
    groups, q_rows, kv_rows = _qkv_split(model)
    tail = qkv.shape[1:]
    q, k, v = qkv.reshape(groups, q_rows + 2 * kv_rows, *tail).split([q_rows, kv_rows, kv_rows], dim=1)
    return [t.reshape(-1, *tail) for t in (q, k, v)]


def _pad_rows(tensor, rows):
    if tensor.shape[0] > rows:
        raise ValueError(f"vocabulary of {tensor.shape[0]} rows does not fit the padded {rows}")
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


TO_MEGATRON: Dict[str, Callable] = {
    "copy": lambda model, rows, t: t,
    "qkv": lambda model, rows, q, k, v: _to_megatron_qkv(model, q, k, v),
    "gated": lambda model, rows, gate, up: torch.cat([gate, up]),
    "vocab": lambda model, rows, t: _pad_rows(t, rows),
    "positions": lambda model, rows, t: t[model.traits.unused_position_rows:],
}
TO_HF: Dict[str, Callable] = {
    "copy": lambda model, t: [t],
    "qkv": _to_hf_qkv,
    "gated": lambda model, t: list(t.chunk(2)),
    "vocab": lambda model, t: [t[: model.vocab_size]],
    # The unused rows are put back by the converter (zeros where none were kept).
    "positions": lambda model, t: [torch.cat([t.new_zeros(model.traits.unused_position_rows, t.shape[1]), t])],
}


def _llama_layer_entries(model: ModelConfig) -> List[Entry]:
    p = "model.layers.{i}."
    return [
        Entry("self_attention.linear_qkv.layer_norm_weight", (p + "input_layernorm.weight",)),
        Entry("self_attention.linear_qkv.weight", tuple(p + f"self_attn.{x}_proj.weight" for x in "qkv"), "qkv"),
        Entry("self_attention.linear_proj.weight", (p + "self_attn.o_proj.weight",)),
        Entry("mlp.linear_fc1.layer_norm_weight", (p + "post_attention_layernorm.weight",)),
        Entry("mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "gated"),
        Entry("mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",)),
    ]


def _opt_layer_entries(model: ModelConfig) -> List[Entry]:
    p = "model.decoder.layers.{i}."
    entries = []
    for suffix in ("weight", "bias"):
        entries += [
            Entry(f"self_attention.linear_qkv.layer_norm_{suffix}", (p + f"self_attn_layer_norm.{suffix}",)),
            Entry(f"self_attention.linear_qkv.{suffix}", tuple(p + f"self_attn.{x}_proj.{suffix}" for x in "qkv"), "qkv"),
            Entry(f"self_attention.linear_proj.{suffix}", (p + f"self_attn.out_proj.{suffix}",)),
            Entry(f"mlp.linear_fc1.layer_norm_{suffix}", (p + f"final_layer_norm.{suffix}",)),
            Entry(f"mlp.linear_fc1.{suffix}", (p + f"fc1.{suffix}",)),
            Entry(f"mlp.linear_fc2.{suffix}", (p + f"fc2.{suffix}",)),
        ]
    return entries


def _llama_global_entries(model: ModelConfig) -> List[Entry]:
    entries = [
        Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
        Entry("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ]
    if not model.tie_word_embeddings:
        entries.append(Entry("output_layer.weight", ("lm_head.weight",), "vocab"))
    return entries


def _opt_global_entries(model: ModelConfig) -> List[Entry]:
    return [
        Entry("embedding.word_embeddings.weight", ("model.decoder.embed_tokens.weight",), "vocab"),
        Entry("embedding.position_embeddings.weight", ("model.decoder.embed_positions.weight",), "positions"),
        Entry("decoder.final_layernorm.weight", ("model.decoder.final_layer_norm.weight",)),
        Entry("decoder.final_layernorm.bias", ("model.decoder.final_layer_norm.bias",)),
    ]


# The tables by Hugging Face model type (ModelConfig.hf_model_type): (layer entries, global entries).
TABLES: Dict[str, Tuple[Callable, Callable]] = {
    "llama": (_llama_layer_entries, _llama_global_entries),
    "opt": (_opt_layer_entries, _opt_global_entries),
}


def layer_entries(model: ModelConfig) -> List[Entry]:
    return TABLES[model.hf_model_type][0](model)


def global_entries(model: ModelConfig) -> List[Entry]:
    return TABLES[model.hf_model_type][1](model)


# Buffers some HF checkpoints carry that are not parameters.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq", "attn.masked_bias", "attn.bias")
# Tied output layers that some HF checkpoints store anyway.
TIED_OUTPUT = ("lm_head.weight",)


def expected_hf_names(model: ModelConfig) -> List[str]:
    names = [n for e in global_entries(model) for n in e.hf]
    for layer in range(model.num_layers):
        names += [n.format(i=layer) for e in layer_entries(model) for n in e.hf]
    return names


def expected_hf_shapes(model: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """The shape of every HF tensor that ``model`` has."""
    d, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    kv = model.query_groups * model.head_dim
    shapes = {}
    for name in expected_hf_names(model):
        leaf = name.rsplit(".", 2)[-2:]
        module, kind = leaf
        if module in ("embed_tokens", "lm_head"):
            shape = (v, d)
        elif module == "embed_positions":
            shape = (model.max_position_embeddings + model.traits.unused_position_rows, d)
        elif module in ("k_proj", "v_proj"):
            shape = (kv, d) if kind == "weight" else (kv,)
        elif module in ("q_proj", "o_proj", "out_proj"):
            shape = (d, d) if kind == "weight" else (d,)
        elif module in ("gate_proj", "up_proj", "fc1"):
            shape = (f, d) if kind == "weight" else (f,)
        elif module in ("down_proj", "fc2"):
            shape = (d, f) if kind == "weight" else (d,)
        else:  # norms
            shape = (d,)
        shapes[name] = shape
    return shapes
