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

import contextlib
import ctypes
import errno
import fcntl
import functools
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

from symnoise_megatron.checkpoint import paths, provenance
from symnoise_megatron.checkpoint.load import model_sharded_state_dict, model_state_names
from symnoise_megatron.common import megatron_versions
from symnoise_megatron.common.files import sha256_of_file, write_json_atomically
from symnoise_megatron.common.processes import pid_alive


def _state(chunks, optimizer, is_loading, optimizer_format: Optional[dict] = None):
    model_state = model_sharded_state_dict(chunks)
    metadata = {"distrib_optim_sharding_type": optimizer_format["sharding"]} if optimizer_format else None
    return {**model_state, "optimizer": optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)}


# The distributed optimizer's state -------------------------------------------------------
# megatron-core 0.16's default format for it ('fully_sharded_model_space') can no longer be
# saved (ShardedTensor.flattened_range is refused), so the format is chosen as Megatron-LM
# does, and recorded: a resume must read the state in the format it was written in.
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"
OPTIMIZER_FORMAT_KEY = "distributed_optimizer_format"


def optimizer_format(optimizer, fully_reshardable: bool, num_chunks: int) -> Optional[dict]:
    """How this run writes the distributed optimizer's state (None: the plain optimizer).

    'dp_reshardable' (Megatron-LM's default): each rank writes its own buffers, in parallel, and
    a resume may change only the data-parallel size. 'fully_reshardable'
    (--dist-ckpt-optim-fully-reshardable): per-parameter state gathered over the data-parallel
    ranks at save, any layout at resume."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    distributed = [part for part in parts if isinstance(part, DistributedOptimizer)]
    if not distributed:
        return None
    # The pipeline split decides which layers a rank's buffers hold, as TP and PP do.
    config = distributed[0].model_chunks[0].config
    split = {key: value for key in PIPELINE_SPLIT_KEYS if (value := getattr(config, key, None))}
    return {"sharding": FULLY_RESHARDABLE if fully_reshardable else DP_RESHARDABLE,
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_stages": num_chunks, **split}


# TransformerConfig's uneven-split fields, recorded only when set (older records: an even split).
PIPELINE_SPLIT_KEYS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
                       "account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")


@contextlib.contextmanager
def _torch_adam_state_loadable(optimizer):
    """Let megatron-core 0.16's DistributedOptimizer load into torch's own Adam (no Transformer
    Engine or apex: this CPU stack). That path reads the step count from torch's per-parameter
    state before loading, which a fresh optimizer lacks (created here, zeros, as torch's first
    step would, for the load to overwrite); its parameter-state readers then copy a per-parameter
    step that the checkpoint does not hold (the fresh zero; the fully-reshardable reader none at all)
    over the step count it has just restored from the parameter groups (kept instead); and its
    DP-reshardable reader copies into views of parameters that require grad (done without autograd).
    With Transformer Engine's Adam the step lives in the parameter groups and only the last applies."""
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = [part for part in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(part, DistributedOptimizer)]
    patched = []
    try:
        for part in parts:
            inner = part.optimizer
            fresh = [param for group in inner.param_groups for param in group["params"] if not inner.state.get(param)]
            if isinstance(inner, torch.optim.Adam):  # not Transformer Engine's: its state is created by megatron-core
                for param in fresh:
                    inner.state[param] = {
                        "step": torch.zeros((), dtype=torch.float32, device=param.device),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
            setter = part._set_main_param_and_optimizer_states  # megatron-core 0.16's reader (setup.py pins <0.17)

            def keep_step(model_param, tensors, part=part, setter=setter):
                group_index, group_order = part.model_param_group_index_map[model_param]
                state = part.optimizer.state[part.optimizer.param_groups[group_index]["params"][group_order]]
                if "step" in state:
                    # Restored as one tensor shared by all parameters, which Adam would count up once per parameter.
                    state["step"] = state["step"].clone()
                    tensors = {**tensors, "step": state["step"]}
                setter(model_param, tensors)

            part._set_main_param_and_optimizer_states = keep_step
            patched.append(part)
        with torch.no_grad():
            yield
    finally:
        for part in patched:
            del part._set_main_param_and_optimizer_states  # the class's method again


def _layout(record: dict) -> str:
    split = ", ".join(f"{key} {record[key]}" for key in PIPELINE_SPLIT_KEYS if record.get(key))
    return (f"TP {record['tensor_model_parallel_size']}, PP {record['pipeline_model_parallel_size']}, "
            f"{record['virtual_pipeline_stages']} virtual stage(s) per rank"
            + (f", {split}" if split else ", an even pipeline split"))


def _format_to_read(directory: str, recorded: Optional[dict], ours: Optional[dict]) -> Optional[dict]:
    """The format to read a checkpoint's optimizer state in, or a ValueError saying why this run cannot."""
    if (recorded is None) != (ours is None):
        saved, now = ("with", "without") if recorded else ("without", "with")
        raise ValueError(f"checkpoint {directory} was saved {saved} --use-distributed-optimizer and this run is {now} it: "
                         "resume with the same setting (the two optimizers keep their state in different layouts)")
    if recorded and recorded["sharding"] == DP_RESHARDABLE and _layout(recorded) != _layout(ours):
        raise ValueError(f"checkpoint {directory} holds the distributed optimizer's state for {_layout(recorded)}; "
                         f"this run is {_layout(ours)}, and that format changes only the data-parallel size: resume "
                         "under the saved layout (a run saved with --dist-ckpt-optim-fully-reshardable resumes under any)")
    return recorded


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


def complete_per_manifest(directory: str) -> bool:
    """Whether ``directory`` has a manifest and every file it lists, at the size it lists (a quick
    check: no hashing)."""
    manifest = os.path.join(directory, MANIFEST)
    if not os.path.exists(manifest):
        return False
    with open(manifest, encoding="utf-8") as handle:
        listed = json.load(handle)["files"]
    return all(os.path.exists(os.path.join(directory, name)) and os.path.getsize(os.path.join(directory, name)) == entry["bytes"]
               for name, entry in listed.items())


def previous_checkpoint(root: str, iteration: Optional[int]) -> str:
    """A sentence naming the newest complete earlier iteration (files as its manifest lists them)."""
    earlier = sorted((n for n in map(paths.iteration_of, os.listdir(root)) if n is not None and (iteration is None or n < iteration)),
                     reverse=True)
    for candidate in earlier:
        directory = paths.iteration_dir(root, candidate)
        if complete_per_manifest(directory):
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


def save_checkpoint(root, iteration, chunks, optimizer, scheduler, sampler, noise, model, make_vocab_size_divisible_by,
                    fully_reshardable_optimizer: bool = False, prompt_template: Optional[str] = None,
                    provenance_record: Optional[dict] = None):
    """``prompt_template``: the training data's, recorded so that generation asks in the same format.
    ``provenance_record``: what the run was made of (checkpoint/provenance.py), into the iteration's folder."""
    written_format = optimizer_format(optimizer, fully_reshardable_optimizer, len(chunks))
    state = _state(chunks, optimizer, is_loading=False, optimizer_format=written_format)
    state.update(iteration=iteration, opt_param_scheduler=scheduler.state_dict(),
                 sampler=sampler.state_dict(), noise=noise.to_dict())
    if written_format:
        state[OPTIMIZER_FORMAT_KEY] = written_format
    with _WritersDieWithSaver():
        return paths.save_atomically(root, iteration, state, {
            "model": asdict(model), "make_vocab_size_divisible_by": make_vocab_size_divisible_by,
            **({"prompt_template": prompt_template} if prompt_template else {})},
            before_publish=functools.partial(_publish, record=provenance_record))


def _publish(staging: str, record: Optional[dict]) -> None:
    """Before the rename: the provenance record, then the manifest (which checksums it too)."""
    if record is not None:
        if dist.get_rank() == 0:
            provenance.write(staging, record)
        dist.barrier()
    write_manifest(staging)


def checkpoint_noise(root: str) -> Optional[dict]:
    """The noise settings the latest checkpoint under ``root`` trained with (None if unrecorded)."""
    return megatron_versions.load_common_state_dict(paths.latest_checkpoint_dir(root)).get("noise")


def load_checkpoint(root, chunks, optimizer, scheduler, sampler) -> int:
    """Restore everything from the latest checkpoint under ``root``; returns its iteration."""
    directory = paths.latest_checkpoint_dir(root)
    recorded = megatron_versions.load_common_state_dict(directory).get(OPTIMIZER_FORMAT_KEY)
    stored_format = _format_to_read(directory, recorded, optimizer_format(optimizer, False, len(chunks)))
    with _torch_adam_state_loadable(optimizer) if stored_format else contextlib.nullcontext():
        state = megatron_versions.load(_state(chunks, optimizer, is_loading=True, optimizer_format=stored_format), directory)
        for chunk, name in zip(chunks, model_state_names(len(chunks))):
            chunk.load_state_dict(state[name], strict=False)
        _match_group_schedules(state["optimizer"], optimizer)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["opt_param_scheduler"])
    _schedule_groups_from(scheduler, optimizer)
    sampler.load_state_dict(state["sampler"])
    return int(state["iteration"])


# A parameter group's learning-rate and weight-decay schedule (megatron-core's ParamGroupOverride
# keys), and what else tells its groups apart (weight decay on or off, ...).
GROUP_SCHEDULE_KEYS = ("max_lr", "min_lr", "start_wd", "end_wd")
GROUP_KIND_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _saved_param_groups(state):
    """Every ``param_groups`` list in a loaded optimizer state (its nesting differs by optimizer)."""
    if isinstance(state, dict):
        for key, value in state.items():
            if key == "param_groups" and isinstance(value, list):
                yield value
            else:
                yield from _saved_param_groups(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _saved_param_groups(value)


def _match_group_schedules(saved_state, optimizer) -> None:
    """The saved groups' schedule as this run's, so that they load onto this run's groups: torch
    would restore the saved max_lr and min_lr (the scheduler reads a group's before its own), and
    megatron-core 0.19 finds a group by them. Which schedule then applies is the scheduler's
    decision (:func:`_schedule_groups_from`)."""
    current = {tuple(group.get(key) for key in GROUP_KIND_KEYS): group for group in optimizer.param_groups}
    for groups in _saved_param_groups(saved_state):
        for group in groups:
            match = current.get(tuple(group.get(key) for key in GROUP_KIND_KEYS))
            for key in GROUP_SCHEDULE_KEYS if match is not None else ():
                if key in match:
                    group[key] = match[key]
                else:
                    group.pop(key, None)


def _schedule_groups_from(scheduler, optimizer) -> None:
    """Every group on the schedule the scheduler settled on at load: this run's flags with
    --override-opt-param-scheduler, the checkpoint's with --use-checkpoint-opt-param-scheduler
    (the groups carry no per-group override of their own here)."""
    settled = dict(max_lr=scheduler.max_lr, min_lr=scheduler.min_lr, start_wd=scheduler.start_wd,
                   end_wd=scheduler.end_wd)
    for group in optimizer.param_groups:
        group.update({key: value for key, value in settled.items() if key in group})


def copy_hf_assets(source_root: str, target_root: str) -> None:
    """Carry the tokenizer/config files of a converted checkpoint into the run's --save."""
    source = os.path.join(source_root, paths.HF_ASSETS)
    if dist.get_rank() == 0 and os.path.isdir(source) and source_root != target_root:
        shutil.copytree(source, os.path.join(target_root, paths.HF_ASSETS), dirs_exist_ok=True)
        info = paths.read_info(source_root)
        os.makedirs(target_root, exist_ok=True)
        paths.write_info(target_root, {k: v for k, v in info.items() if k in ("hf_config", "converted_from")})
