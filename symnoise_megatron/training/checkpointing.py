"""Training checkpoints with megatron-core dist_checkpointing, written atomically
(``paths.save_atomically``: a crash mid-save leaves the previous checkpoint the latest). Nothing in training draws from a stateful
random generator (the noise is counter-based, dropout is off), so no RNG state is needed to
resume exactly; the sampler resumes from the consumed-sample count.

Each saved iteration carries a manifest of its files' sizes and SHA-256 (hashed in parallel,
one share of the files per rank), checked before a resume. One run at a time holds ``--save``
(a lock file), and the checkpoint writers megatron-core forks die with the process that
forked them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import time
import zlib
from dataclasses import asdict
from typing import Optional

import torch.distributed as dist

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.checkpoint.load import model_sharded_state_dict, model_state_names
from symnoise_megatron.common.files import sha256_of_file, write_json_atomically
from symnoise_megatron.common.processes import pid_alive


def _state(chunks, optimizer, is_loading):
    model_state = model_sharded_state_dict(chunks)
    return {**model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading)}


MANIFEST = "symnoise_manifest.json"
LOCK = "symnoise_save.lock"
_PR_SET_PDEATHSIG = 1


# Writers die with their parent ------------------------------------------------------------
# megatron-core's torch_dist save forks one writer per bucket (filesystem_async.py,
# write_preloaded_data_multiproc). A fork inherits the trainer's memory; if the trainer is
# SIGKILLed mid-save, the writer would stay behind (parent PID 1) blocked on its result pipe.
_saving_parent: Optional[int] = None
_fork_hook_installed = False


def _set_parent_death_signal() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return False


def _die_with_parent() -> None:
    global _saving_parent
    if _saving_parent is None or not _set_parent_death_signal():
        return
    if os.getppid() != _saving_parent:  # the parent died before prctl took effect
        os._exit(1)
    _saving_parent = os.getpid()  # a writer's own children are tied to the writer


class _WritersDieWithSaver:
    """While a save runs, every process forked from this one gets SIGKILL when it loses its parent."""

    def __enter__(self):
        global _saving_parent, _fork_hook_installed
        if not _fork_hook_installed:
            os.register_at_fork(after_in_child=_die_with_parent)  # cannot be unregistered: gated by _saving_parent
            _fork_hook_installed = True
        _saving_parent = os.getpid()

    def __exit__(self, *exc):
        global _saving_parent
        _saving_parent = None


# Checksums -----------------------------------------------------------------------------
def _files(directory: str):
    out = []
    for base, _, names in os.walk(directory):
        out += [os.path.relpath(os.path.join(base, name), directory) for name in names]
    return sorted(name for name in out if name != MANIFEST)


def _gather(mine):
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, mine)
    return everything


def _writer(name: str, world: int) -> int:
    """The rank that wrote a torch_dist shard (``__<rank>_<n>.distcp``), whose page cache still
    holds it; other files go round the ranks."""
    match = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
    # Other files by their name alone: ranks may list a shared file system differently.
    return (int(match.group(1)) if match else zlib.crc32(name.encode())) % world


def write_manifest(directory: str) -> None:
    """Every rank hashes the shards it wrote; rank 0 writes the manifest (before the rename)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = {name: {"bytes": os.path.getsize(os.path.join(directory, name)), "sha256": sha256_of_file(os.path.join(directory, name))}
            for name in _files(directory) if _writer(name, world) == rank}
    entries = {name: entry for share in _gather(mine) for name, entry in share.items()}
    if dist.get_rank() == 0:
        write_json_atomically(os.path.join(directory, MANIFEST), {"algorithm": "sha256", "files": entries},
                              fsync=True, indent=1, sort_keys=True)


def previous_checkpoint(root: str, iteration: Optional[int]) -> str:
    """A sentence naming the newest complete earlier iteration (files as its manifest lists them)."""
    earlier = sorted((n for n in map(paths.iteration_of, os.listdir(root)) if n is not None and (iteration is None or n < iteration)),
                     reverse=True)
    for candidate in earlier:
        directory = paths.iteration_dir(root, candidate)
        manifest = os.path.join(directory, MANIFEST)
        if not os.path.exists(manifest):
            continue
        with open(manifest, encoding="utf-8") as handle:
            listed = json.load(handle)["files"]
        if all(os.path.exists(os.path.join(directory, name)) and os.path.getsize(os.path.join(directory, name)) == entry["bytes"]
               for name, entry in listed.items()):
            return (f"the previous good checkpoint is iteration {candidate} ({directory}): write {candidate} into "
                    f"{os.path.join(root, paths.TRACKER)} to resume from it")
    return f"there is no earlier complete checkpoint in {root}"


def verify_checkpoint(root: str, log=print) -> None:
    """Check the latest checkpoint's files against its manifest, a share per rank, before loading.

    Checkpoints without a manifest (converted ones, older runs) are not checked. Raises
    ValueError naming each bad file and the previous good iteration."""
    iteration = paths.read_tracker(root)
    directory = paths.iteration_dir(root, iteration)
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest_path):
        return
    started = time.perf_counter()
    with open(manifest_path, encoding="utf-8") as handle:
        listed = json.load(handle)["files"]
    problems, hashed = [], 0
    for name in sorted(listed)[dist.get_rank()::dist.get_world_size()]:
        path, entry = os.path.join(directory, name), listed[name]
        if not os.path.exists(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != entry["bytes"]:
            problems.append(f"{path} has {os.path.getsize(path)} bytes, the save wrote {entry['bytes']} (truncated or overwritten)")
        else:
            hashed += entry["bytes"]
            if sha256_of_file(path) != entry["sha256"]:
                problems.append(f"{path} is corrupted: its SHA-256 differs from the one written at save")
    shares = _gather((problems, hashed))
    problems = [p for share, _ in shares for p in share]
    if problems:
        raise ValueError(f"checkpoint {directory} is damaged: " + "; ".join(problems) + "; " + previous_checkpoint(root, iteration))
    total = sum(h for _, h in shares)
    log(f"verified {len(listed)} checkpoint files ({total / 1e9:.2f} GB) against {MANIFEST} "
        f"in {time.perf_counter() - started:.1f}s")


# One run per --save ----------------------------------------------------------------------
class SaveLock:
    """An exclusive ``flock`` on ``<save>/symnoise_save.lock`` holding this run's PID and host.

    The kernel drops a flock when its process dies, so a lock file left by a dead run is
    free: it is taken over, with a warning naming the run that left it."""

    def __init__(self, root: str, log=print):
        self.path, self.fd = os.path.join(root, LOCK), None
        try:
            os.makedirs(root, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:  # read-only, full, permissions
            raise ValueError(f"--save {root} is not writable ({error.strerror}: {error.filename})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            if error.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise ValueError(f"--save {root} is in use by another run ({holder or 'unknown'}; lock file {self.path}); "
                             "stop that run or give this one another --save") from None
        left = self._holder()
        if left:
            here = socket.gethostname()
            dead = left.get("host") == here and not pid_alive(int(left.get("pid", 0)))
            log(f"WARNING: taking over the lock of a run that is gone (pid {left.get('pid')} on {left.get('host')}"
                f"{', no longer running' if dead else ''}) in {self.path}")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, record.encode(), 0)
            os.fsync(self.fd)
        except OSError as error:
            self.release()
            raise ValueError(f"--save {root}: cannot write its lock file {self.path} ({error.strerror})") from None

    def _holder(self) -> Optional[dict]:
        try:
            text = os.pread(self.fd, 4096, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return {"pid": "?", "host": "?"}

    def release(self) -> None:
        if getattr(self, "fd", None) is not None:
            try:
                os.ftruncate(self.fd, 0)  # a clean exit leaves nothing to take over
            finally:
                os.close(self.fd)  # closing drops the flock
                self.fd = None

    __del__ = release


def save_checkpoint(root, iteration, chunks, optimizer, scheduler, sampler, noise, model, make_vocab_size_divisible_by):
    state = _state(chunks, optimizer, is_loading=False)
    state.update(iteration=iteration, opt_param_scheduler=scheduler.state_dict(),
                 sampler=sampler.state_dict(), noise=noise.to_dict())
    with _WritersDieWithSaver():
        return paths.save_atomically(root, iteration, state, {
            "model": asdict(model), "make_vocab_size_divisible_by": make_vocab_size_divisible_by},
            before_publish=write_manifest)


def checkpoint_noise(root: str) -> Optional[dict]:
    """The noise settings the latest checkpoint under ``root`` trained with (None if unrecorded)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(paths.latest_checkpoint_dir(root)).get("noise")


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
