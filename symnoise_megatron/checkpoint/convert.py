"""Hugging Face <-> megatron-core distributed checkpoints for LLaMA-1/2/3 and OPT.

``hf_to_megatron`` builds no model: each rank reads the HF tensors of the layers it owns
(layers ``rank::world_size``; rank 0 also the embeddings and final norm) one at a time,
puts them in megatron-core's tensor-parallel-1 layout, and all ranks write one ``torch_dist``
checkpoint together. That checkpoint loads under any TP/PP. Memory per rank is what it owns
plus one tensor being read, so running it with more ranks (``torchrun --nproc-per-node N``)
divides the memory of a 70B conversion.

``megatron_to_hf`` reads the checkpoint one layer at a time and writes safetensors shards,
config.json, generation_config.json and the tokenizer files back.

Neither writes into a folder that holds something else (``overwrite`` replaces its contents),
and neither touches a training run's checkpoints: a converted ``release`` beside them would
move the run's latest pointer, and ``from_pretrained`` would load stale weight files left
beside new ones.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from typing import Dict, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from symnoise_megatron.checkpoint import layouts, paths
from symnoise_megatron.checkpoint.hf_config import hf_config_from_model, model_config_from_hf
from symnoise_megatron.checkpoint.layouts import LAYER_PREFIX, TO_HF, TO_MEGATRON
from symnoise_megatron.checkpoint.layouts import OPT_UNUSED_POSITIONS_FILE, OPT_UNUSED_POSITIONS_KEY
from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader, ShardedSafetensorsWriter, copy_files
from symnoise_megatron.model.config import ModelConfig, padded_vocab_size

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
)
HF_ASSET_FILES = TOKENIZER_FILES + ("generation_config.json",)


def _ensure_process_group():
    if dist.is_initialized():
        return
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process (no torchrun): a private store, so two conversions on one machine
        # never meet on a fixed port.
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("gloo", rank=int(os.environ.get("RANK", 0)), world_size=world_size)


def read_hf_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a folder: expected a Hugging Face model directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {directory} is no Hugging Face model directory")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def check_target(save_dir: str, load_dir: str, overwrite: bool, *, replaces_release: bool = False) -> list:
    """Refuse a target that would mix old files with the new ones; returns its current entries.

    A non-empty folder needs ``overwrite`` (which replaces everything in it). Megatron
    checkpoints in it are refused even then, naming them: a training run's ``iter_*`` always, an
    earlier conversion (``release``) unless ``replaces_release`` (hf-to-megatron replacing it).
    """
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ValueError(f"--save-dir {save_dir} is a file, not a folder")
    entries = sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else []
    if not entries:
        return entries
    held = paths.checkpoints_in(save_dir)
    if not replaces_release:
        held += [name for name in (paths.RELEASE, paths.TRACKER) if name in entries and name not in held]
    if held:
        raise ValueError(
            f"--save-dir {save_dir} holds megatron checkpoints ({', '.join(held[:6])}{' ...' if len(held) > 6 else ''}); "
            "a conversion never writes over them, not even with --overwrite: choose another folder"
        )
    if not overwrite:
        shown = ", ".join(entries[:6]) + (" ..." if len(entries) > 6 else "")
        raise ValueError(
            f"--save-dir {save_dir} is not empty ({shown}); choose a new or empty folder, or pass --overwrite "
            "to replace everything in it"
        )
    if _inside(load_dir, save_dir):
        raise ValueError(f"--overwrite would delete --load-dir {load_dir}: it lies inside --save-dir {save_dir}")
    return entries


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
    tensors = [reader.get(name.format(i=layer), finite=True) for name in entry.hf]
    out = TO_MEGATRON[entry.transform](model, rows, *tensors)
    return out.to(dtype) if dtype is not None else out.contiguous()


def hf_to_megatron(
    load_dir: str,
    save_dir: str,
    make_vocab_size_divisible_by: int = 128,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> ModelConfig:
    """Convert an HF LLaMA/OPT directory into a megatron-core checkpoint at ``save_dir``.

    ``save_dir`` must be new or empty; ``overwrite`` replaces what is in it, an earlier
    conversion included, but never a training run's ``iter_*`` checkpoints.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    old_entries = check_target(save_dir, load_dir, overwrite, replaces_release=True)
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
    dist.barrier()  # every rank has checked the folder as it was before rank 0 writes into it
    if old_entries and rank == 0:
        _remove_entries(save_dir, old_entries)
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
        if model.traits.unused_position_rows:
            _keep_opt_unused_positions(reader, assets, dtype, model.traits.unused_position_rows)
    paths.save_atomically(save_dir, None, sharded, {
        "model": asdict(model), "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
        "hf_config": hf_config, "converted_from": os.path.abspath(load_dir),
    })
    return model


def _remove_entries(directory: str, entries) -> None:
    for name in entries:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _keep_opt_unused_positions(reader: HFCheckpointReader, assets: str, dtype: Optional[torch.dtype],
                               unused_rows: int) -> None:
    from safetensors.torch import save_file

    rows = reader.get("model.decoder.embed_positions.weight")[:unused_rows]
    rows = rows.to(dtype) if dtype is not None else rows
    save_file({OPT_UNUSED_POSITIONS_KEY: rows.contiguous()}, os.path.join(assets, OPT_UNUSED_POSITIONS_FILE))


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


def model_config_of(checkpoint_root: str) -> ModelConfig:
    return ModelConfig(**paths.read_info(checkpoint_root)["model"])


def _load_full(metadata, checkpoint_dir):
    """Whole tensors (layer tensors with their layer axis) for the given checkpoint keys.

    A key is read whole: megatron-core's torch_dist reader cannot read one layer of a
    stacked tensor when other layers exist, so peak memory is the largest stacked key.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from symnoise_megatron.common import megatron_versions

    request = {
        key: ShardedTensor.from_rank_offsets(key, torch.empty(meta.global_shape, dtype=meta.dtype), replica_id=0,
                                             allow_shape_mismatch=not key.startswith(LAYER_PREFIX))
        for key, meta in metadata.items()
    }
    return megatron_versions.load(request, checkpoint_dir)


def megatron_to_hf(load_dir: str, save_dir: str, max_shard_bytes: int = 5 * 2**30, progress: bool = True,
                   overwrite: bool = False) -> ModelConfig:
    """Write the latest checkpoint under ``load_dir`` as an HF directory at ``save_dir``.

    ``save_dir`` must be new or empty; ``overwrite`` replaces everything in it. The directory
    is written beside ``save_dir`` and moved into place when complete, so an interrupted run
    leaves the old contents (or nothing), never a mix.
    """
    from megatron.core import dist_checkpointing

    check_target(save_dir, load_dir, overwrite)
    info = paths.read_info(load_dir)
    model = ModelConfig(**info["model"])
    checkpoint_dir = paths.latest_checkpoint_dir(load_dir)
    _ensure_process_group()
    if dist.get_world_size() > 1:
        raise ValueError("megatron-to-hf runs in one process (every rank would write the same files): run it without torchrun")
    metadata = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    target = os.path.realpath(save_dir)
    staging = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_hf(load_dir, checkpoint_dir, staging, info, model, metadata, max_shard_bytes, progress)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return model


def _move_into_place(staging: str, target: str) -> None:
    """Replace ``target`` (absent, empty, or checked by :func:`check_target`) by ``staging``."""
    if not os.path.exists(target):
        os.replace(staging, target)
        return
    previous = f"{staging}.previous"
    os.replace(target, previous)
    os.replace(staging, target)
    shutil.rmtree(previous)


def _write_hf(load_dir, checkpoint_dir, save_dir, info, model, metadata, max_shard_bytes, progress) -> None:
    writer = ShardedSafetensorsWriter(save_dir, max_shard_bytes)

    globals_ = {e.megatron: e for e in layouts.global_entries(model)}
    missing = [key for key in globals_ if key not in metadata]
    if missing:
        raise ValueError(f"{checkpoint_dir}: missing tensors {missing}")
    loaded = _load_full({k: metadata[k] for k in globals_}, checkpoint_dir)
    for key, entry in globals_.items():
        tensors = TO_HF[entry.transform](model, loaded[key])
        if entry.transform == "positions":
            kept = _opt_unused_positions(load_dir, tensors[0], model.traits.unused_position_rows)
            if kept is not None:
                tensors[0][:model.traits.unused_position_rows] = kept
        writer.add(dict(zip(entry.hf, tensors)))
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
