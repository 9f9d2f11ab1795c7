"""A megatron-core checkpoint's weights as Hugging Face safetensors shards, streamed.

megatron-core stores each transformer tensor stacked over the layers (``decoder.layers.<name>``
of shape [layers, ...]). Each process reads one layer's slice of one such tensor at a time
(megatron-core's ``dist_checkpointing.load`` reads a slice of a stored tensor through torch
DCP, which reads only the stored pieces that overlap it), turns it into the HF tensors, and
writes them at their places in shards whose layout is planned before anything is read. A
process therefore holds at most one layer's tensor (plus the embedding or output layer, read
whole), whatever the model's size. Under torchrun each rank takes a share of the layers
(layer ``i`` goes to rank ``i % world``) and all ranks write into the same files.

The files are those the single-process converter wrote before: the same tensors in the same
shards, byte for byte (``ShardedSafetensorsLayout``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from symnoise_megatron.checkpoint import layouts, paths
from symnoise_megatron.checkpoint.layouts import LAYER_PREFIX, OPT_UNUSED_POSITIONS_FILE, OPT_UNUSED_POSITIONS_KEY, TO_HF, Entry
from symnoise_megatron.checkpoint.safetensors_io import PlannedTensor, ShardedSafetensorsLayout
from symnoise_megatron.model.config import ModelConfig


@dataclass(frozen=True)
class Read:
    """One read from the checkpoint: a layer's slice of a stacked tensor, or a global tensor whole."""

    entry: Entry
    layer: Optional[int] = None

    @property
    def key(self) -> str:
        return self.entry.megatron if self.layer is None else LAYER_PREFIX + self.entry.megatron

    def hf_names(self) -> List[str]:
        return [name.format(i=self.layer) for name in self.entry.hf]


class ExportPlan:
    """What the export writes and who reads what, decided from the checkpoint's metadata alone
    (every rank computes the same plan, so the ranks need not exchange it)."""

    def __init__(self, model: ModelConfig, metadata: dict, checkpoint_dir: str, max_shard_bytes: int):
        self.model = model
        self.global_entries = layouts.global_entries(model)
        self.layer_entries = layouts.layer_entries(model)
        missing = [e.megatron for e in self.global_entries if e.megatron not in metadata]
        missing += [LAYER_PREFIX + e.megatron for e in self.layer_entries if LAYER_PREFIX + e.megatron not in metadata]
        if missing:
            raise ValueError(f"{checkpoint_dir}: missing tensors {missing}")
        for entry in self.layer_entries:
            stacked = tuple(metadata[LAYER_PREFIX + entry.megatron].global_shape)
            if not stacked or stacked[0] != model.num_layers:
                raise ValueError(f"{checkpoint_dir}: {LAYER_PREFIX + entry.megatron} has shape {stacked}, "
                                 f"not {model.num_layers} stacked layers as its symnoise_checkpoint.json says")
        shapes = layouts.expected_hf_shapes(model)
        dtype = {Read(e).key: metadata[Read(e).key].dtype for e in self.global_entries}
        dtype.update({LAYER_PREFIX + e.megatron: metadata[LAYER_PREFIX + e.megatron].dtype for e in self.layer_entries})
        # The order the converter has always written (globals, then each layer tensor over the
        # layers): the shards keep their contents.
        ordered = [Read(e) for e in self.global_entries]
        ordered += [Read(e, layer) for e in self.layer_entries for layer in range(model.num_layers)]
        self.layout = ShardedSafetensorsLayout(
            [PlannedTensor(name, shapes[name], dtype[read.key]) for read in ordered for name in read.hf_names()],
            max_shard_bytes)
        self.metadata = metadata

    def reads_of(self, rank: int, world: int) -> List[Read]:
        """Rank ``rank``'s reads: all tensors of its layers, then its share of the global tensors
        (dealt on from where the layers stopped, so ranks with fewer layers take them)."""
        layers = range(rank, self.model.num_layers, world)
        reads = [Read(entry, layer) for layer in layers for entry in self.layer_entries]
        reads += [Read(entry) for j, entry in enumerate(self.global_entries)
                  if (self.model.num_layers + j) % world == rank]
        return reads

    def steps(self, world: int) -> int:
        """How many reads every rank makes: megatron-core's load is collective, so a rank with
        fewer reads joins the others' with empty ones."""
        return max(len(self.reads_of(rank, world)) for rank in range(world))


def _load(checkpoint_dir: str, metadata: dict, read: Optional[Read]) -> Optional[torch.Tensor]:
    """The tensor ``read`` names (a layer's slice keeps its leading axis of 1); None joins the
    other ranks' load with nothing to read."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from symnoise_megatron.common import megatron_versions

    if read is None:
        megatron_versions.load({}, checkpoint_dir, validate_access_integrity=False)
        return None
    meta = metadata[read.key]
    shape = tuple(meta.global_shape)
    if read.layer is None:
        request = ShardedTensor.from_rank_offsets(read.key, torch.empty(shape, dtype=meta.dtype), replica_id=0,
                                                  allow_shape_mismatch=True)
    else:
        request = ShardedTensor.from_rank_offsets(read.key, torch.empty((1,) + shape[1:], dtype=meta.dtype),
                                                  (0, read.layer, shape[0]), replica_id=0)
    # Each rank reads only its slices: no rank covers the whole tensor, which megatron-core's
    # access check would otherwise require.
    return megatron_versions.load({read.key: request}, checkpoint_dir, validate_access_integrity=False)[read.key]


def _hf_tensors(plan: ExportPlan, read: Read, loaded: torch.Tensor, load_dir: str) -> Dict[str, torch.Tensor]:
    model = plan.model
    tensors = TO_HF[read.entry.transform](model, loaded if read.layer is None else loaded[0])
    if read.entry.transform == "positions":
        kept = _opt_unused_positions(load_dir, tensors[0], model.traits.unused_position_rows)
        if kept is not None:
            tensors[0][:model.traits.unused_position_rows] = kept
    return dict(zip(read.hf_names(), tensors))


def write_weights(plan: ExportPlan, checkpoint_dir: str, load_dir: str, directory: str, progress: bool = True) -> None:
    """All ranks: write the plan's shards into ``directory`` (which rank 0 has created, empty)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        plan.layout.create(directory)
    dist.barrier()
    reads = plan.reads_of(rank, world)
    steps = plan.steps(world)
    with plan.layout.writer(directory) as writer:
        for step in tqdm(range(steps), desc="tensors", disable=not progress or rank != 0):
            read = reads[step] if step < len(reads) else None
            loaded = _load(checkpoint_dir, plan.metadata, read)
            if read is not None:
                for name, tensor in _hf_tensors(plan, read, loaded, load_dir).items():
                    writer.write(name, tensor)
            del loaded
    dist.barrier()
    if rank == 0:
        plan.layout.write_index(directory)


def _opt_unused_positions(load_dir: str, like: torch.Tensor, unused_rows: int) -> Optional[torch.Tensor]:
    """The rows hf-to-megatron kept, or None (a model trained from scratch never had them)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(load_dir, paths.HF_ASSETS, OPT_UNUSED_POSITIONS_FILE)
    if not os.path.exists(path):
        return None
    try:
        rows = load_file(path)[OPT_UNUSED_POSITIONS_KEY]
    except (SafetensorError, KeyError) as error:
        raise ValueError(f"{path}: cannot read OPT's unused position rows: {error}") from None
    if tuple(rows.shape) != (unused_rows, like.shape[1]):
        raise ValueError(f"{path}: OPT's unused position rows have shape {tuple(rows.shape)}, "
                         f"the model needs ({unused_rows}, {like.shape[1]})")
    return rows.to(like.dtype)
