"""The megatron-core releases the package runs on, and one named adapter per difference between them.

CI runs two: 0.16.1 on Python 3.11 and 0.19.x on Python 3.12 (``setup.py`` admits
``>=0.16.1,<0.20``). Everything else the package calls is the same API under both and is called
directly, with no adapter: the model class (``GPTModel``: 0.19 deprecates it in favour of
``HybridModel`` but builds the same model, docs/architecture.md), the layer specs
(``get_gpt_layer_local_spec``, ``get_gpt_layer_with_transformer_engine_spec``), the process
groups (megatron-core's global parallel state, which both turn into the modules'
``ProcessGroupCollection`` when none is passed), DDP, the optimizer, the schedules and
``dist_checkpointing.save``.

Two things differ. The name of the CUDA graph capture regions in ``TransformerConfig``:
``cuda_graph_scope`` under 0.16, ``cuda_graph_modules`` under 0.19, which migrates the old field
with a deprecation warning (:func:`cuda_graph_regions_field`). And the checkpoint format's common part (the iteration, scheduler, sampler, noise
settings: everything that is not a tensor shard). 0.16 writes it to ``common.pt`` beside the
torch_dist files and reads only that; 0.19 writes it inside the torch_dist files, as one object
``common_state``, reads both, and dropped the ``common_strategy`` argument of
``dist_checkpointing.load``. :func:`load` and :func:`load_common_state_dict` read either format
under either release, so a checkpoint saved under 0.19 loads and resumes under 0.16 (the other
direction megatron-core 0.19 does itself).
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
from typing import Tuple

COMMON_STATE_FILE = "common.pt"
# Where 0.19 keeps the common state instead: a ShardedObject of this key inside the torch_dist files.
COMMON_STATE_KEY = "common_state"


def megatron_core_version() -> Tuple[int, int]:
    """(major, minor) of the installed megatron-core."""
    major, minor = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("megatron-core")).groups()
    return int(major), int(minor)


def cuda_graph_regions_field() -> str:
    """The ``TransformerConfig`` field naming the layer parts a CUDA graph captures (attn, mlp)."""
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    names = {field.name for field in dataclasses.fields(TransformerConfig)}
    return "cuda_graph_modules" if "cuda_graph_modules" in names else "cuda_graph_scope"


def reads_common_state_inside() -> bool:
    """Whether megatron-core's own readers find a ``common_state`` object inside the torch_dist files
    (0.19 does; 0.16 reads ``common.pt`` only)."""
    return megatron_core_version() >= (0, 19)


def _needs_adapter(checkpoint_dir: str) -> bool:
    return not reads_common_state_inside() and not os.path.exists(os.path.join(str(checkpoint_dir), COMMON_STATE_FILE))


def _common_state_inside(checkpoint_dir: str) -> dict:
    """The common state that megatron-core 0.19 saved inside the torch_dist files, read here in one
    process: the object's bytes through torch's own checkpoint reader, then a weights-only load."""
    import torch
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    key = ShardedObject(COMMON_STATE_KEY, None, (1,), (0,)).unique_key
    state = {key: io.BytesIO()}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint_dir)), no_dist=True)
    loaded = state[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def _common_strategy():
    """megatron-core 0.16's common-state reader, taught to read the object 0.19 writes."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class CommonStateInside(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return _common_state_inside(checkpoint_dir)

    return CommonStateInside()


def load_common_state_dict(checkpoint_dir: str) -> dict:
    """``dist_checkpointing.load_common_state_dict`` for a checkpoint of either format."""
    from megatron.core import dist_checkpointing

    if _needs_adapter(checkpoint_dir):
        return _common_state_inside(checkpoint_dir)
    return dist_checkpointing.load_common_state_dict(checkpoint_dir)


def load(sharded_state_dict: dict, checkpoint_dir: str, **kwargs) -> dict:
    """``dist_checkpointing.load`` for a checkpoint of either format (``kwargs`` pass through)."""
    from megatron.core import dist_checkpointing

    if _needs_adapter(checkpoint_dir):
        kwargs["common_strategy"] = _common_strategy()
    return dist_checkpointing.load(sharded_state_dict, checkpoint_dir, **kwargs)
