"""Hugging Face <-> megatron-core distributed checkpoints for LLaMA-1/2/3 and OPT.

``hf_to_megatron`` builds no model: each rank reads the HF tensors of the layers it owns
(layers ``rank::world_size``; rank 0 also the embeddings and final norm) one at a time,
puts them in megatron-core's tensor-parallel-1 layout, and all ranks write one ``torch_dist``
checkpoint together. That checkpoint loads under any TP/PP. Memory per rank is what it owns
plus one tensor being read, so running it with more ranks (``torchrun --nproc-per-node N``)
divides the memory of a 70B conversion.

``megatron_to_hf`` streams the checkpoint into safetensors shards (``hf_export``: one layer's
tensor in memory at a time per process; under torchrun the ranks share the layers) and writes
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

from symnoise_megatron.checkpoint import layouts, paths, provenance
from symnoise_megatron.checkpoint.hf_config import hf_config_from_model, model_config_from_hf
from symnoise_megatron.checkpoint.layouts import LAYER_PREFIX, TO_MEGATRON
from symnoise_megatron.checkpoint.layouts import OPT_UNUSED_POSITIONS_FILE, OPT_UNUSED_POSITIONS_KEY
from symnoise_megatron.checkpoint.hf_export import ExportPlan, write_weights
from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader, copy_files
from symnoise_megatron.checkpoint.serving_files import template_to_export, write_serving_files
from symnoise_megatron.common.versions import software_versions
from symnoise_megatron.common.files import read_json
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
    return read_json(path)


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
    }, before_publish=lambda staging: _write_conversion_record(staging, load_dir, model, dtype, make_vocab_size_divisible_by))
    return model


def _write_conversion_record(staging: str, load_dir: str, model: ModelConfig, dtype: Optional[torch.dtype],
                             make_vocab_size_divisible_by: int) -> None:
    """What the converted checkpoint came from (rank 0, into ``release/`` before it is published)."""
    if dist.get_rank() != 0:
        return
    provenance.write(staging, provenance.new_record("conversion", {
        "converted_from": os.path.abspath(load_dir), "model": asdict(model),
        "dtype": str(dtype).replace("torch.", "") if dtype else None,
        "make_vocab_size_divisible_by": make_vocab_size_divisible_by, "versions": software_versions()},
        [provenance.history_entry("convert", None)]))


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


def model_config_of(checkpoint_root: str) -> ModelConfig:
    return ModelConfig(**paths.read_info(checkpoint_root)["model"])


def megatron_to_hf(load_dir: str, save_dir: str, max_shard_bytes: int = 5 * 2**30, progress: bool = True,
                   overwrite: bool = False, prompt_template: Optional[str] = None) -> ModelConfig:
    """Write the latest checkpoint under ``load_dir`` as an HF directory at ``save_dir``.

    ``prompt_template`` (default: the one the checkpoint records, a fine-tune's training data's)
    becomes the tokenizer's chat template, with NEFTune's decoding as generation_config.json
    (``serving_files``); without either, or without a kept tokenizer, the base model's files
    are kept as they were (``template_to_export`` says why).

    All ranks of the process group (torchrun) share the work: each streams its share of the
    layers into the shards (``hf_export``). ``save_dir`` must be new or empty; ``overwrite``
    replaces everything in it. The directory is written beside ``save_dir`` and moved into
    place when complete, so an interrupted run leaves the old contents (or nothing), never a mix.
    """
    from megatron.core import dist_checkpointing

    # Every rank checks (they read the same files), so a refusal ends them all alike.
    check_target(save_dir, load_dir, overwrite)
    info = paths.read_info(load_dir)
    model = ModelConfig(**info["model"])
    template, _ = template_to_export(load_dir, prompt_template)  # before any work: a bad request is refused
    checkpoint_dir = paths.latest_checkpoint_dir(load_dir)
    metadata = dist_checkpointing.load_tensors_metadata(checkpoint_dir)
    plan = ExportPlan(model, metadata, checkpoint_dir, max_shard_bytes)
    _ensure_process_group()
    first = dist.get_rank() == 0
    target = os.path.realpath(save_dir)
    # Rank 0's name for the folder being written, shared with the others.
    staging = [os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.partial-{os.getpid()}")]
    dist.broadcast_object_list(staging, src=0)
    staging = staging[0]
    if first:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        write_weights(plan, checkpoint_dir, load_dir, staging, progress)
        if first:
            _write_hf_files(load_dir, staging, info, model, metadata)
            if template is not None:
                write_serving_files(staging, template)
            _move_into_place(staging, target)
        dist.barrier()
    finally:
        if first:
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


def _write_hf_files(load_dir, save_dir, info, model, metadata) -> None:
    """Beside the weights: config.json and the tokenizer and generation files kept at conversion."""
    with open(os.path.join(save_dir, "config.json"), "w", encoding="utf-8") as handle:
        config = hf_config_from_model(model, info.get("hf_config"))
        config["torch_dtype"] = config["dtype"] = str(metadata["embedding.word_embeddings.weight"].dtype).replace("torch.", "")
        json.dump(config, handle, indent=2)
    copy_files(os.path.join(load_dir, paths.HF_ASSETS), save_dir, HF_ASSET_FILES)
    _write_export_record(load_dir, save_dir, model)


def _write_export_record(load_dir: str, save_dir: str, model: ModelConfig) -> None:
    """What the Hugging Face directory holds: the checkpoint and iteration it came from, and that
    checkpoint's own record (its data, noise, history) as ``source``."""
    iteration = paths.read_tracker(load_dir)
    provenance.write(save_dir, provenance.new_record(
        "export", {"exported_from": os.path.abspath(load_dir), "iteration": "release" if iteration is None else iteration,
                   "model": asdict(model), "versions": software_versions()},
        [provenance.history_entry("export", iteration)], source=provenance.latest_record(load_dir)))
