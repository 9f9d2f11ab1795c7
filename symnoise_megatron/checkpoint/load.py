"""Load a megatron-core checkpoint's weights into this rank's model chunks, under any layout."""

from __future__ import annotations

from typing import List

import torch


def model_state_names(count: int) -> List[str]:
    """Where Megatron-LM nests the chunks' states: ``model``, or ``model0..`` with virtual stages."""
    return ["model"] if count == 1 else [f"model{i}" for i in range(count)]


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> dict:
    return {name: chunk.sharded_state_dict() for name, chunk in zip(model_state_names(len(chunks)), chunks)}


def _drop_absent_objects(state: dict, present: set) -> List[str]:
    """Remove ShardedObjects (TE's ``_extra_state``) that the checkpoint does not have."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    dropped = []
    for name in list(state):
        value = state[name]
        if isinstance(value, dict):
            dropped += _drop_absent_objects(value, present)
        elif isinstance(value, ShardedObject) and value.key not in present:
            del state[name]
            dropped.append(name)
    return dropped


def load_model_weights(chunks: List[torch.nn.Module], checkpoint_dir: str) -> None:
    """Fill ``chunks`` from the checkpoint in ``checkpoint_dir`` (an ``iter_*`` or ``release`` dir).

    A converted checkpoint has no ``_extra_state`` (Transformer Engine's FP8 scaling history):
    those entries are left at their initial values, everything else must be present.
    """
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from symnoise_megatron.common import megatron_versions

    request = model_sharded_state_dict(chunks)
    present = set(load_sharded_metadata(checkpoint_dir))
    allowed_missing = set(_drop_absent_objects(request, present))
    loaded = megatron_versions.load(request, checkpoint_dir)
    for chunk, name in zip(chunks, model_state_names(len(chunks))):
        result = chunk.load_state_dict(loaded[name], strict=False)
        missing = [key for key in result.missing_keys if key not in allowed_missing and not key.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{checkpoint_dir}: does not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
            )
