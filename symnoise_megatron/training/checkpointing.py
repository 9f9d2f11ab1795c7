"""Training checkpoints with megatron-core dist_checkpointing, written atomically
(``paths.save_atomically``: a crash mid-save leaves the previous checkpoint the latest). Nothing in training draws from a stateful
random generator (the noise is counter-based, dropout is off), so no RNG state is needed to
resume exactly; the sampler resumes from the consumed-sample count.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict

import torch.distributed as dist

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.checkpoint.load import model_sharded_state_dict, model_state_names


def _state(chunks, optimizer, is_loading):
    model_state = model_sharded_state_dict(chunks)
    return {**model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


def save_checkpoint(root, iteration, chunks, optimizer, scheduler, sampler, noise, model, make_vocab_size_divisible_by):
    state = _state(chunks, optimizer, is_loading=False)
    state.update(iteration=iteration, opt_param_scheduler=scheduler.state_dict(),
                 sampler=sampler.state_dict(), noise=noise.to_dict())
    return paths.save_atomically(root, iteration, state, {
        "model": asdict(model), "make_vocab_size_divisible_by": make_vocab_size_divisible_by})


def load_checkpoint(root, chunks, optimizer, scheduler, sampler) -> int:
    """Restore everything from the latest checkpoint under ``root``; returns its iteration."""
    from megatron.core import dist_checkpointing

    directory = paths.latest_checkpoint_dir(root)
    state = dist_checkpointing.load(_state(chunks, optimizer, is_loading=True), directory)
    for chunk, name in zip(chunks, model_state_names(len(chunks))):
        chunk.load_state_dict(state[name], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    sampler.load_state_dict(state["sampler"])
    return int(state["iteration"])


def copy_hf_assets(source_root: str, target_root: str) -> None:
    """Carry the tokenizer/config files of a converted checkpoint into the run's --save."""
    source = os.path.join(source_root, paths.HF_ASSETS)
    if dist.get_rank() == 0 and os.path.isdir(source) and source_root != target_root:
        shutil.copytree(source, os.path.join(target_root, paths.HF_ASSETS), dirs_exist_ok=True)
        info = paths.read_info(source_root)
        os.makedirs(target_root, exist_ok=True)
        paths.write_info(target_root, {k: v for k, v in info.items() if k in ("hf_config", "converted_from")})
