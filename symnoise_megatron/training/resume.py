"""Resume or load: which checkpoint the run starts from, and the checks before it does.

A checkpoint in --save wins over --load: a requeued job reruns the same command line. The
checks run in the order the run reaches them: the checkpoint's files and model before any
model is built, its noise settings before the build, its learning-rate schedule when the
optimizer state is read.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.checkpoint.convert import model_config_of
from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.training import checkpointing
from symnoise_megatron.training.arguments import TrainingConfig, flag_name
from symnoise_megatron.training.lock_file import take_save_lock

def tokenizer_checkpoint(config: TrainingConfig) -> Optional[str]:
    """The checkpoint whose hf_assets hold the tokenizer the data must match: the one the run starts from."""
    return config.checkpoint.save if paths.has_checkpoint(config.checkpoint.save) else config.model.load


def acquire_save_lock(save: Optional[str], log):
    """Rank 0 holds --save's lock for the run (a flock, or a lock file where flock is refused: lock_file);
    every rank stops if another run holds it."""
    if not save:
        return None
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = take_save_lock(save, log)
        except ValueError as refused:
            error = str(refused)
    verdict = [error]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])
    return lock


class ResumeOrLoad:
    """The run's starting point: a checkpoint in --save to resume, weights from --load, or nothing."""

    def __init__(self, config: TrainingConfig, log):
        self.config, self.log = config, log
        self.save = config.checkpoint.save
        self.resuming = paths.has_checkpoint(self.save)

    def check_checkpoint(self, model_config: ModelConfig) -> None:
        """The checkpoint to resume: its files against their checksums, its model against this run's."""
        if not self.resuming:
            return
        checkpointing.verify_checkpoint(self.save, self.log)
        saved = model_config_of(self.save)
        if saved != model_config:
            raise ValueError(
                f"--save {self.save} holds a checkpoint of another model ({saved}); "
                f"this run builds {model_config}"
            )

    def check_noise(self, noise: NoiseConfig) -> None:
        """As the learning-rate schedule: a resume with other noise settings is refused unless asked for,
        since the next save would record the new settings over the old and hide the change."""
        if not self.resuming:
            return
        recorded = checkpointing.checkpoint_noise(self.save) or {}
        ours = noise.to_dict()
        # The noise a checkpoint records (NoiseConfig: kind, alpha, seed, pairing) is set by --noise-KEY.
        differing = [f"{flag_name('noise_' + key)} {ours[key]} (checkpoint: {recorded[key]})"
                     for key in ("kind", "alpha", "seed", "pairing") if key in recorded and recorded[key] != ours[key]]
        if not differing:
            return
        message = f"--save {self.save}: this run's noise differs from the checkpoint's: {', '.join(differing)}"
        if not self.config.noise.override_noise_config:
            raise ValueError(message + "; pass --override-noise-config to train on with this run's settings")
        self.log("WARNING: " + message + " (--override-noise-config: training on with this run's)")

    def weights_source(self) -> Optional[str]:
        """The checkpoint directory to take only the weights from (--finetune, or a converted
        checkpoint without a tracker), unless the run resumes."""
        load = self.config.model.load
        weights_only = load and (self.config.model.finetune or paths.read_tracker(load) is None)
        return paths.latest_checkpoint_dir(load) if weights_only and not self.resuming else None

    def restore(self, chunks, optimizer, scheduler, sampler) -> int:
        """The iteration to start at: the resumed checkpoint's (its state loaded into the arguments), else 0."""
        if not self.resuming:
            if self.config.model.load and self.save:
                checkpointing.copy_hf_assets(self.config.model.load, self.save)
            return 0
        try:
            iteration = checkpointing.load_checkpoint(self.save, [c.module for c in chunks], optimizer, scheduler, sampler)
        except AssertionError as error:  # megatron-core's scheduler asserts on a changed schedule
            if "OptimizerParamScheduler" not in str(error):
                raise
            raise ValueError(
                f"--save {self.save}: this run's learning-rate schedule differs from the checkpoint's ({error}); "
                "pass --override-opt-param-scheduler to use this run's, or --use-checkpoint-opt-param-scheduler "
                "to keep the checkpoint's") from None
        except (ValueError, FileNotFoundError):
            raise
        # An unreadable file of a checkpoint without checksums (older runs); torch's CheckpointException
        # derives from BaseException, not Exception.
        except (Exception, CheckpointException) as error:
            raise ValueError(
                f"could not read checkpoint {paths.latest_checkpoint_dir(self.save)} ({type(error).__name__}: {error}); "
                + checkpointing.previous_checkpoint(self.save, paths.read_tracker(self.save))) from error
        self.log(f"resumed from {paths.latest_checkpoint_dir(self.save)} at iteration {iteration}")
        return iteration
