"""Hugging Face <-> megatron-core distributed checkpoints for LLaMA-1/2/3 and OPT.

``hf_to_megatron`` builds no model: each rank reads the HF tensors of the layers it owns
(layers ``rank::world_size``; rank 0 also the embeddings and final norm) one at a time,
puts them in megatron-core's tensor-parallel-1 layout, and all ranks write one ``torch_dist``
checkpoint together. That checkpoint loads under any TP/PP. Memory per rank is what it owns
plus one tensor being read, so running it with more ranks (``torchrun --nproc-per-node N``)
divides the memory of a 70B conversion.

``megatron_to_hf`` reads the checkpoint one layer at a time and writes safetensors shards,
config.json, generation_config.json and the tokenizer files back.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Dict, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from symnoise_megatron.checkpoint import layouts, paths
from symnoise_megatron.checkpoint.hf_config import hf_config_from_model, model_config_from_hf
from symnoise_megatron.checkpoint.layouts import LAYER_PREFIX, TO_HF, TO_MEGATRON
from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader, ShardedSafetensorsWriter, copy_files
from symnoise_megatron.model.config import ModelConfig, padded_vocab_size

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
HF_ASSET_FILES = TOKENIZER_FILES + ("generation_config.json",)


def _ensure_process_group():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1)))


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def tokenizer_vocab_size(directory: str) -> Optional[int]:
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if os.path.exists(os.path.join(directory, "tokenizer.model")):
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=os.path.join(directory, "tokenizer.model")).vocab_size()
    return None


def check_hf_checkpoint(reader: HFCheckpointReader, model: ModelConfig) -> None:
    """Refuse missing, extra or misshapen tensors, naming them."""
    expected = layouts.expected_hf_shapes(model)
    present = {n for n in reader.names() if not n.endswith(layouts.IGNORED_HF_SUFFIXES)}
    if model.tie_word_embeddings:
        present -= set(layouts.TIED_OUTPUT)
    missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise ValueError(f"{reader.directory}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise ValueError(f"{reader.directory}: unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''} for {model.architecture}")
    for name, shape in expected.items():
        actual = reader.shape(name)
        if tuple(actual) != shape:
            raise ValueError(f"{reader.directory}: {name} has shape {tuple(actual)}, config.json implies {shape}")


def _entry_tensors(reader, entry, layer, model, rows, dtype):
    tensors = [reader.get(name.format(i=layer)) for name in entry.hf]
    out = TO_MEGATRON[entry.transform](model, rows, *tensors)
    return out.to(dtype) if dtype is not None else out.contiguous()


def hf_to_megatron(
    load_dir: str,
    save_dir: str,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> ModelConfig:
    """Convert an HF LLaMA/OPT directory into a megatron-core checkpoint at ``save_dir``."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    hf_config = read_hf_config(load_dir)
    model = model_config_from_hf(hf_config)
    reader = HFCheckpointReader(load_dir)
    check_hf_checkpoint(reader, model)
    tokens = tokenizer_vocab_size(load_dir)
    if tokens is not None and tokens > model.vocab_size:
        raise ValueError(
            f"{load_dir}: the tokenizer has {tokens} tokens but the embedding only {model.vocab_size} rows"
        )
    _ensure_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = padded_vocab_size(model.vocab_size, make_vocab_size_divisible_by, 1)
    sharded: Dict[str, ShardedTensor] = {}
    if rank == 0:
        for entry in layouts.global_entries(model):
            sharded[entry.megatron] = ShardedTensor.from_rank_offsets(
                entry.megatron, _entry_tensors(reader, entry, 0, model, rows, dtype),
                replica_id=0, allow_shape_mismatch=entry.transform == "vocab",
            )
    owned = range(rank, model.num_layers, world)
    for layer in tqdm(owned, desc=f"rank {rank} layers", disable=not progress or rank != 0):
        for entry in layouts.layer_entries(model):
            key = LAYER_PREFIX + entry.megatron
            sharded[f"{key}.{layer}"] = ShardedTensor.from_rank_offsets(
                key, _entry_tensors(reader, entry, layer, model, rows, dtype),
                (0, layer, model.num_layers), replica_id=0, prepend_axis_num=1,
            )
    if rank == 0:
        assets = os.path.join(save_dir, paths.HF_ASSETS)
        os.makedirs(assets, exist_ok=True)
        copy_files(load_dir, assets, HF_ASSET_FILES)
    paths.save_atomically(save_dir, None, sharded, {
        "model": asdict(model), "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "hf_config": hf_config, "converted_from": os.path.abspath(load_dir),
    })
    return model


def model_config_of(checkpoint_root: str) -> ModelConfig:
    return ModelConfig(**paths.read_info(checkpoint_root)["model"])


def _load_full(metadata, checkpoint_dir):
    """Whole tensors (layer tensors with their layer axis) for the given checkpoint keys.

    A key is read whole: megatron-core's torch_dist reader cannot read one layer of a
    stacked tensor when other layers exist, so peak memory is the largest stacked key.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {
        key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype), replica_id=0,
                                             allow_shape_mismatch=not key.startswith(LAYER_PREFIX))
        for key, meta in metadata.items()
    }
    return dist_checkpointing.load(request, checkpoint_dir)


def megatron_to_hf(load_dir: str, save_dir: str, max_shard_bytes: int = 5 * 2**30, progress: bool = True) -> ModelConfig:
    """Write the latest checkpoint under ``load_dir`` as an HF directory at ``save_dir``."""
    from megatron.core import dist_checkpointing

    info = paths.read_info(load_dir)
    model = ModelConfig(**info["model"])
    checkpoint_dir = paths.latest_checkpoint_dir(load_dir)
    _ensure_process_group()
    metadata = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    writer = ShardedSafetensorsWriter(save_dir, max_shard_bytes)

    globals_ = {e.megatron: e for e in layouts.global_entries(model)}
    missing = [key for key in globals_ if key not in metadata]
    if missing:
        raise ValueError(f"{checkpoint_dir}: missing tensors {missing}")
    loaded = _load_full({k: metadata[k] for k in globals_}, checkpoint_dir)
    for key, entry in globals_.items():
        writer.add(dict(zip(entry.hf, TO_HF[entry.transform](model, loaded[key]))))
    entries = layouts.layer_entries(model)
    absent = [LAYER_PREFIX + e.megatron for e in entries if LAYER_PREFIX + e.megatron not in metadata]
    if absent:
        raise ValueError(f"{checkpoint_dir}: missing layer tensors {absent}")
    for entry in tqdm(entries, desc="tensors", disable=not progress):
        key = LAYER_PREFIX + entry.megatron
        stacked = _load_full({key: metadata[key]}, checkpoint_dir)[key]
        for layer in range(model.num_layers):
            names = [name.format(i=layer) for name in entry.hf]
            writer.add(dict(zip(names, TO_HF[entry.transform](model, stacked[layer]))))
        del stacked
    writer.close()
    with open(os.path.join(save_dir, "config.json"), "w", encoding="utf-8") as handle:
        config = hf_config_from_model(model, info.get("hf_config"))
        config["torch_dtype"] = config["dtype"] = str(metadata["embedding.word_embeddings.weight"].dtype).replace("torch.", "")
        json.dump(config, handle, indent=2)
    copy_files(os.path.join(load_dir, paths.HF_ASSETS), save_dir, HF_ASSET_FILES)
    return model
