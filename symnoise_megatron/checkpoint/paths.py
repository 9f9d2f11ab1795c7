"""Megatron-LM's checkpoint directory layout: ``latest_checkpointed_iteration.txt`` and
``release/`` or ``iter_0000100/`` beside it, plus the project's ``symnoise_checkpoint.json``;
and writing one iteration into it atomically."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
from typing import Callable, List, Optional

from symnoise_megatron.common.files import write_json_atomically, write_text_atomically

TRACKER = "latest_checkpointed_iteration.txt"
INFO = "symnoise_checkpoint.json"
HF_ASSETS = "hf_assets"
RELEASE = "release"


def iteration_dir(root: str, iteration: Optional[int]) -> str:
    return os.path.join(root, RELEASE if iteration is None else f"iter_{iteration:07d}")


_ITERATION = re.compile(r"iter_(\d+)(\.partial)?$")


def iteration_of(name: str) -> Optional[int]:
    """The iteration of a finished ``iter_N`` folder's name, else None (``.partial``, others)."""
    match = _ITERATION.match(name)
    return int(match.group(1)) if match and not match.group(2) else None


def unfinished_saves(root: str) -> List[str]:
    """``*.partial`` folders: saves that were still being written when their run stopped."""
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root) if name.endswith(".partial"))


def checkpoints_in(root: str) -> List[str]:
    """A training run's checkpoints in ``root``: its ``iter_*`` folders (finished or not) and
    the tracker when it names an iteration (it may point at a folder since removed)."""
    if not os.path.isdir(root):
        return []
    found = sorted(name for name in os.listdir(root) if _ITERATION.match(name))
    tracker = os.path.join(root, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as handle:
            text = handle.read().strip()
        if text != RELEASE:
            found.append(f"{TRACKER} (says {text!r})")
    return found


def missing_checkpoint_error(root: str, missing: str) -> FileNotFoundError:
    """Why ``root`` has no readable checkpoint: only unfinished saves, no folder, or not a checkpoint."""
    unfinished = unfinished_saves(root)
    finished = [name for name in os.listdir(root) if name == RELEASE or iteration_of(name) is not None] if unfinished else []
    if unfinished and not finished:
        return FileNotFoundError(
            f"{root} holds only an unfinished save ({', '.join(unfinished)}): its run stopped while writing it, "
            f"before any checkpoint was complete ({missing} is missing), so there is nothing to load"
        )
    if not os.path.isdir(root):
        return FileNotFoundError(f"{root} does not exist")
    return FileNotFoundError(f"{root}: no {missing}; is this a megatron checkpoint directory?")


def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker names: None for ``release``."""
    path = os.path.join(root, TRACKER)
    if not os.path.exists(path):
        raise missing_checkpoint_error(root, TRACKER)
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if text == RELEASE:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}: expected an iteration number or 'release', got {text!r}") from None


def write_tracker(root: str, iteration: Optional[int]) -> None:
    """Point the tracker at a complete checkpoint, atomically."""
    write_text_atomically(os.path.join(root, TRACKER), RELEASE if iteration is None else str(iteration))


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, TRACKER))


def latest_checkpoint_dir(root: str) -> str:
    return iteration_dir(root, read_tracker(root))


def read_info(root: str) -> dict:
    path = os.path.join(root, INFO)
    if not os.path.exists(path):
        if unfinished_saves(root) or not os.path.isdir(root):
            raise missing_checkpoint_error(root, INFO)
        raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by symnoise-megatron")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_info(root: str, info: dict) -> None:
    write_json_atomically(os.path.join(root, INFO), info, indent=2)


def _in_process_write_results():
    """megatron-core's checkpoint writer passes its results through a queue served by a helper
    process that it spawns at the first save (re-importing the entry point: seconds) and keeps.
    SLURM sends SIGTERM to every process of a job step (time limit, scancel, preemption), so
    the signal that asks for a final save killed the helper and the save with it. These saves
    are synchronous: the results never leave this process, and a plain queue carries them."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if hasattr(filesystem_async, "_results_queue") and not isinstance(filesystem_async._results_queue, queue.Queue):
        filesystem_async._results_queue = queue.Queue()


def save_atomically(root: str, iteration: Optional[int], sharded_state: dict, info: dict,
                    before_publish: Optional[Callable[[str], None]] = None) -> str:
    """Write one iteration (None: ``release``) with megatron-core dist_checkpointing, all ranks.

    The checkpoint goes to ``<dir>.partial`` and is renamed once every rank has finished; only
    then are the info file (updated with ``info``) and the tracker moved, so a crash mid-save
    leaves the previous checkpoint the latest, intact. ``before_publish(staging)`` runs on every
    rank once all have written, before the rename (the training's checksums). Returns the
    iteration's directory.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    target = iteration_dir(root, iteration)
    staging = target + ".partial"
    first = dist.get_rank() == 0
    if first:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    _in_process_write_results()
    dist_checkpointing.save(sharded_state, staging)
    dist.barrier()
    if before_publish is not None:
        before_publish(staging)
        dist.barrier()
    if first:
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        existing = read_info(root) if os.path.exists(os.path.join(root, INFO)) else {}
        write_info(root, {**existing, **info})
        write_tracker(root, iteration)
    dist.barrier()
    return target
