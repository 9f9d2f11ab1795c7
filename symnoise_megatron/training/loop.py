"""The fine-tuning loop on megatron-core: the run's parts wired together, then trained.

The parts, each built by its own module of this package: the data (``datasets``), the model
chunks (``model_chunks``), the optimizer and scheduler (``optimizer``), the starting point
(``resume``), the metrics sink (``metrics_sink``) and the stop conditions (``stopping``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import List, Optional

import torch
import torch.distributed as dist

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.data.sampler import GlobalBatchSampler
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.model.builder import built_with_transformer_engine
from symnoise_megatron.runtime.parallel import compute_device, initialize_distributed
from symnoise_megatron.runtime.userbuffers import initialize_tp_comm_overlap, userbuffer_modes, userbuffer_shape
from symnoise_megatron.training import checkpointing, retention
from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.training.batches import HostStep, RankInputs, StepBatches
from symnoise_megatron.training.datasets import check_tokenizers, load_training_data
from symnoise_megatron.training.cuda_graphs import CudaGraphCapture
from symnoise_megatron.training.device_feed import DeviceFeed
from symnoise_megatron.training.forward_step import forward_step, schedule_shape
from symnoise_megatron.training.metrics_sink import MetricsSink, check_logging_packages
from symnoise_megatron.training.model_chunks import (
    build_training_chunks, build_transformer_config, check_interleaving, check_transformer_engine_features,
    parallel_layout, resolve_model_config, sync_parameters,
)
from symnoise_megatron.training.garbage_collection import ManualGC
from symnoise_megatron.training.optimizer import build_optimizer_and_scheduler, train_iterations
from symnoise_megatron.training.prefetch import Prefetcher
from symnoise_megatron.training.provenance import start_record, with_iteration
from symnoise_megatron.training.resume import ResumeOrLoad, acquire_save_lock, tokenizer_checkpoint
from symnoise_megatron.training.stopping import StopConditions


class TrainingStopped(RuntimeError):
    pass


class Trainer:
    """One fine-tuning run; ``run()`` trains until ``train_iters``, an exit condition or SIGTERM.

    ``config``: the flags (TrainingConfig); ``model_config``: the model's shape (ModelConfig);
    ``transformer_config``: megatron-core's TransformerConfig of this rank's ``chunks``.
    """

    def __init__(self, config: TrainingConfig, log=print):
        from megatron.core import parallel_state

        # Everything that can be checked without a model is, first: a bad flag, file, tokenizer,
        # layout or batch shape fails before any model is built.
        config.validate()
        self.config, self.log = config, log
        self.datasets = load_training_data(config.data, config.optimizer.seed)
        log(self.datasets.split_description())
        validation_note = self.datasets.validation_note(config.logging.eval_interval)
        if validation_note:
            log(validation_note)
        self.model_config = resolve_model_config(config, self.datasets.vocab_size)
        check_tokenizers(config.data, self.datasets.described(), tokenizer_checkpoint(config), log)
        self.parallel = parallel_layout(config, self.model_config)
        check_transformer_engine_features(config)
        # Refuses a --seq-length a step could not run at.
        self.batches = StepBatches(config, self.datasets.pad_id, self.model_config.hidden_size)
        check_logging_packages(config.logging)

        initialize_distributed(self.parallel, seed=config.optimizer.seed,
                               timeout_minutes=config.parallelism.distributed_timeout_minutes,
                               cuda_graphs=config.performance.uses_cuda_graphs)
        self.device = compute_device()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.sampler = self._sampler(self.datasets.train_order(config.optimizer.seed))  # checks the batch shape first
        self.sampler.check_resumed_order = not config.data.override_data_config
        self.save_lock = acquire_save_lock(config.checkpoint.save, log)  # then --save is created and held
        self.start = ResumeOrLoad(config, log)
        self.start.check_checkpoint(self.model_config)
        self.noise = config.noise.noise_config()
        self.start.check_noise(self.noise)
        self.provenance = start_record(config, self.datasets, self.model_config, self.parallel, self.noise,
                                       self.start.resuming, log)
        options = config.optimizer
        # The micro-batches a step runs on this rank (both copies of each under microbatch pairing).
        microbatches = self.noise.microbatches_per_step(
            options.global_batch_size // (options.micro_batch_size * self.dp_size))
        check_interleaving(self.parallel, microbatches, self.noise.pairing == "microbatch" and self.noise.is_symmetric)
        self.train_iters = train_iterations(config, len(self.datasets.train_indices))

        self.transformer_config = build_transformer_config(config, self.model_config, self.parallel)
        if config.performance.tp_comm_overlap:  # before the model: its layers look the buffers up when built
            precision = config.precision
            initialize_tp_comm_overlap(userbuffer_shape(
                config.data.seq_length, self.noise.rows_per_microbatch(options.micro_batch_size),
                self.model_config.hidden_size, self.parallel.context_parallel_size),
                self.parallel.tensor_model_parallel_size,
                userbuffer_modes(bool(precision.fp8_format), precision.keeps_layers_in_bf16), precision.params_dtype)
        self.chunks = build_training_chunks(config, self.model_config, self.noise, self.transformer_config, self.parallel,
                                            self.device, self.start.weights_source(), self.datasets.mean_sample_length, log)
        self.optimizer, self.scheduler = build_optimizer_and_scheduler(config, self.chunks, self.train_iters)
        self.iteration = self.start.restore(self.chunks, self.optimizer, self.scheduler, self.sampler)
        self.batches.rank = RankInputs(
            tokens=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
            targets=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
            thd=config.data.pack_sequences and any(built_with_transformer_engine(c) for c in self.chunks),
            pin=self.device.type == "cuda")
        # The next step's batches are built while this one runs (training/prefetch.py).
        self.train_batches = Prefetcher(lambda consumed: self.batches.staged(
            self.sampler.batch_at(consumed), self.datasets.train_indices, self.datasets.train, self.noise), "train",
            self.device)
        self.cuda_graphs = CudaGraphCapture(
            config, self.transformer_config, self.chunks, self.optimizer, *self._schedule_shape(self.noise), microbatches,
            self.dp_size)
        blend = self.datasets.blend_description(self.sampler.order, self.sampler.consumed_samples + (
            self.train_iters - self.iteration) * config.optimizer.global_batch_size)
        if blend:
            log(blend)
        self.metrics = MetricsSink(config, self.model_config, log)
        self.stop = StopConditions(config.checkpoint, self.device)
        self.skipped_iterations = 0
        self.history: List[dict] = []
        self.gc = ManualGC(config.performance)

    def _sampler(self, order) -> GlobalBatchSampler:
        options = self.config.optimizer
        return GlobalBatchSampler(order, options.global_batch_size, options.micro_batch_size, self.dp_rank, self.dp_size)

    def close(self) -> None:
        """Let another run take --save (also at exit: the kernel drops the lock with the process)."""
        if getattr(self, "train_batches", None) is not None:
            self.train_batches.close()  # a batch built ahead is dropped: the sampler never counted it
            self.train_batches = None
        if getattr(self, "gc", None) is not None:
            self.gc.stop()
        if getattr(self, "save_lock", None) is not None:
            self.save_lock.release()
            self.save_lock = None

    # the loop ---------------------------------------------------------------------------
    def run(self) -> List[dict]:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> List[dict]:
        self.stop.arm()
        self.gc.start()
        self.metrics.start()
        while self.iteration < self.train_iters:
            record = self._train_one_iteration()
            if self.metrics.log_due(self.train_iters):  # as Megatron-LM: the step's line, then its validation
                self.metrics.log_window(record, self.train_iters, self.sampler.consumed_samples,
                                        self.skipped_iterations, self._noise_scale())
            if self._due(self.config.logging.eval_interval) and len(self.datasets.valid_indices):
                with self.metrics.paused(), self.gc.around_validation():
                    record["validation_loss"] = self.evaluate()
                self.metrics.validation(record["validation_loss"])
            self.history.append(record)
            stop_reason = self.stop.reason(self.iteration)
            if self.config.checkpoint.save and (self._due(self.config.checkpoint.save_interval) or stop_reason
                                                or self.iteration == self.train_iters):
                self.save()
            if stop_reason:
                self.log(f"exiting at iteration {self.iteration} ({stop_reason})")
                break
            self.gc.after_iteration(self.iteration)
        sync_parameters(self.chunks)  # the weights the run ends with, whatever reads them next
        if self.iteration >= self.train_iters and not self.history:
            self.log(f"nothing to train: the run is at iteration {self.iteration} of {self.train_iters} "
                     "(raise --train-iters or --train-epochs to train on)")
        self.metrics.finish()
        return self.history

    def _train_one_iteration(self) -> dict:
        loss, grad_norm, tokens, success = self.train_step()
        self.iteration += 1
        self.metrics.count_step(self.iteration, self.last_step_positions * self.dp_size)
        return {"iteration": self.iteration, "loss": loss, "grad_norm": float(grad_norm or 0.0),
                "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]), "tokens": tokens}

    def _due(self, interval: Optional[int]) -> bool:
        return bool(interval) and self.iteration % interval == 0

    def _noise_scale(self) -> float:
        """The last step's mean alpha / sqrt(L * d) over its samples on every data-parallel rank."""
        from megatron.core import parallel_state

        totals = self.last_step_noise_totals.to(self.device)  # NCCL reduces device tensors only
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        return float(totals[0] / totals[1]) if totals[1] > 0 else 0.0

    # steps ------------------------------------------------------------------------------
    def train_step(self):
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        for chunk in self.chunks:
            chunk.train()
        self.cuda_graphs.before_step(settle=self.train_batches.settle)
        consumed = self.sampler.consumed_samples
        more = self.iteration + 1 < self.train_iters
        step = self.train_batches.get(consumed, consumed + self.config.optimizer.global_batch_size if more else None)
        self.sampler.advance()  # only now: a checkpoint counts the batches trained on, not those built ahead
        self.last_step_positions = step.positions
        self.last_step_noise_totals = step.noise_totals
        loss_sum, tokens = self._run_schedule(step, self.noise, forward_only=False)
        loss = loss_sum / max(tokens, 1)
        if not math.isfinite(loss):
            if not self.config.optimizer.skip_nonfinite_loss:
                save = self.config.checkpoint.save
                last = paths.latest_checkpoint_dir(save) if paths.has_checkpoint(save) else "none"
                raise TrainingStopped(f"loss is {loss} at iteration {self.iteration + 1}; last checkpoint: {last} "
                                      "(--skip-nonfinite-loss skips such steps instead)")
            self.skipped_iterations += 1
            return loss, 0.0, tokens, False
        success, grad_norm, _ = self.optimizer.step()
        if success:
            self.scheduler.step(increment=1)
        else:
            self.skipped_iterations += 1
        return loss, grad_norm, tokens, success

    def evaluate(self) -> Optional[float]:
        """The validation loss (no noise) over --eval-iters global batches of the validation set."""
        valid_indices = self.datasets.valid_indices
        if len(valid_indices) == 0:
            return None
        sync_parameters(self.chunks)
        for chunk in self.chunks:
            chunk.eval()
        sampler = self._sampler(self.datasets.valid_order())
        clean = NoiseConfig("none")
        batches = Prefetcher(lambda consumed: self.batches.staged(
            sampler.batch_at(consumed), valid_indices, self.datasets.valid, clean), "validation", self.device)
        loss_sum = tokens = 0.0
        size, iters = self.config.optimizer.global_batch_size, self.config.logging.eval_iters
        try:
            with torch.no_grad():
                for index in range(iters):
                    step = batches.get(index * size, (index + 1) * size if index + 1 < iters else None)
                    step_sum, step_tokens = self._run_schedule(step, clean, True)
                    loss_sum, tokens = loss_sum + step_sum, tokens + step_tokens
        finally:
            batches.close()
        return loss_sum / max(tokens, 1)

    def save(self):
        sync_parameters(self.chunks)
        target = checkpointing.save_checkpoint(
            self.config.checkpoint.save, self.iteration, [c.module for c in self.chunks], self.optimizer, self.scheduler,
            self.sampler, self.noise, self.model_config, self.config.model.make_vocab_size_divisible_by,
            fully_reshardable_optimizer=self.config.checkpoint.dist_ckpt_optim_fully_reshardable,
            prompt_template=self.datasets.train.meta.get("prompt_template"),
            provenance_record=with_iteration(self.provenance, self.iteration))
        self.log(f"saved checkpoint at iteration {self.iteration} to {target}")
        options = self.config.checkpoint
        if options.keep_last and dist.get_rank() == 0:
            retention.remove_old_checkpoints(options.save, options.keep_last, options.keep_every, self.log)

    def _schedule_shape(self, noise: NoiseConfig):
        """(seq_length, rows) of the schedule's stage buffers with static shapes (every step's)."""
        rows = noise.rows_per_microbatch(self.config.optimizer.micro_batch_size)
        packed_on_thd = self.batches.rank.thd
        seq = self.config.data.seq_length
        return (rows * seq, 1) if packed_on_thd else (seq, rows)

    def _run_schedule(self, step: HostStep, noise: NoiseConfig, forward_only: bool):
        """The step's micro-batches through megatron-core's schedule, each moved to the device just
        before its first forward (``DeviceFeed``)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        feed = DeviceFeed(step.staged, self.device, len(self.chunks))
        first = step.staged[0]
        seq_length, rows = schedule_shape(self.chunks[0], first.data, first.rows)
        step_function = partial(forward_step, every_position=True) if self.batches.static_shapes else forward_step
        reports = get_forward_backward_func()(
            forward_step_func=step_function, data_iterator=feed.iterators(), model=self.chunks,
            num_microbatches=len(feed), seq_length=seq_length, micro_batch_size=rows, forward_only=forward_only,
        )
        return self._global_loss(reports)

    def _global_loss(self, reports):
        """(summed loss, loss tokens) over the whole global batch, on every rank."""
        from megatron.core import parallel_state

        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        if reports and parallel_state.get_tensor_model_parallel_rank() == 0:
            total += torch.stack([r["lm loss"] for r in reports]).sum(0).double()
        dist.all_reduce(total)
        return float(total[0]), float(total[1])
