"""The fine-tuning loop on megatron-core: DDP, its optimizer and scheduler, its schedules."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.checkpoint.convert import model_config_of
from symnoise_megatron.checkpoint.load import load_model_weights
from symnoise_megatron.data.microbatch import MicroBatch, concatenate, paired_microbatches
from symnoise_megatron.data.sampler import GlobalBatchSampler, SampleOrder
from symnoise_megatron.data.sft_dataset import Sample, SFTIndexedData, collate, empty_packed_row, pack, split_indices
from symnoise_megatron.data.tokenizer import TokenizerSpec, identity_differences
from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config, transformer_engine_available
from symnoise_megatron.model.config import preset
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding import noisy_embeddings
from symnoise_megatron.runtime.cpu import is_cpu_only
from symnoise_megatron.runtime.hardware import device_peak_tflops
from symnoise_megatron.runtime.parallel import compute_device, initialize_distributed
from symnoise_megatron.training import checkpointing, metrics
from symnoise_megatron.training.arguments import TOKENIZER_TYPES, TrainingConfig
from symnoise_megatron.training.forward_step import forward_step, schedule_shape
from symnoise_megatron.training.optimizer import build_optimizer


class TrainingStopped(RuntimeError):
    pass


def trimmed_to_longest(microbatches: List[MicroBatch], multiple: int) -> List[MicroBatch]:
    """The step's micro-batches cut to its longest real token, rounded up to ``multiple``.

    Padding only ever follows real tokens, so cutting it changes no loss and no noise; it
    saves the compute that a fixed --seq-length spends on padding (short instruction data).
    All micro-batches of a step keep one length: pipeline stages exchange one shape.
    """
    longest = max(int((mb.real_tokens() * torch.arange(1, mb.tokens.shape[1] + 1)).max()) for mb in microbatches)
    full = microbatches[0].tokens.shape[1]
    length = min(full, max(multiple, -(-longest // multiple) * multiple))
    return [mb.truncated(length) for mb in microbatches] if length < full else microbatches


NOISE_FLAGS = {"kind": "--noise-kind", "alpha": "--noise-alpha", "seed": "--noise-seed", "pairing": "--noise-pairing"}


def check_tokenizers(cfg: TrainingConfig, datasets, checkpoint_root: Optional[str], log) -> None:
    """The data's recorded tokenizer against --tokenizer-model/--tokenizer-type and against the
    tokenizer in the checkpoint's hf_assets: data tokenized for another vocabulary trains
    without an error otherwise (ids simply index other embedding rows).

    ``datasets``: (flag, prefix, meta) for --data-path and --valid-data-path."""
    if cfg.tokenizer_type:
        # A type names a file format, not a vocabulary: LLaMA's tokenizer ships as tokenizer.model
        # and tokenizer.json alike, so another format is only worth a word; identities decide.
        expected = TOKENIZER_TYPES[cfg.tokenizer_type]
        for flag, prefix, meta in datasets:
            if meta["tokenizer"].get("kind") != expected:
                log(f"WARNING: --tokenizer-type {cfg.tokenizer_type} names a {expected} tokenizer; {flag} {prefix} was "
                    f"tokenized from a {meta['tokenizer'].get('kind')} file ({meta['tokenizer'].get('path')}). Training uses "
                    "the data's tokens; the checks against --tokenizer-model and the checkpoint's tokenizer decide")
    if cfg.tokenizer_model:
        given = cfg.tokenizer_model
        spec = TokenizerSpec(model_file=given) if os.path.isfile(given) else TokenizerSpec(directory=given)
        identity = spec.load().identity()
        for flag, prefix, meta in datasets:
            differences = identity_differences(meta["tokenizer"], identity)
            if differences:
                raise ValueError(f"--tokenizer-model {given} is not the tokenizer {flag} {prefix} was preprocessed with "
                                 f"({meta['tokenizer'].get('path')}): {'; '.join(differences)}. The data carries its "
                                 "tokenizer; --tokenizer-model only checks it")
    if not checkpoint_root:
        return
    assets = os.path.join(checkpoint_root, paths.HF_ASSETS)
    if not any(os.path.exists(os.path.join(assets, name)) for name in ("tokenizer.json", "tokenizer.model")):
        return  # a checkpoint without a tokenizer (a preset trained from scratch): nothing to compare
    identity = TokenizerSpec(directory=assets).load().identity()
    for flag, prefix, meta in datasets:
        differences = identity_differences(meta["tokenizer"], identity)
        if not differences:
            continue
        message = (f"{flag} {prefix} was tokenized with {meta['tokenizer'].get('path')}, which is not the tokenizer of the "
                   f"checkpoint {checkpoint_root} ({assets}): {'; '.join(differences)}")
        if not cfg.allow_tokenizer_mismatch:
            raise ValueError(message + "; preprocess the data with the checkpoint's tokenizer, or pass "
                             "--allow-tokenizer-mismatch to train anyway")
        log("WARNING: " + message + " (--allow-tokenizer-mismatch: training anyway)")


def _parallel(cfg: TrainingConfig, num_layers: int) -> ParallelConfig:
    vpp = None
    if cfg.num_layers_per_virtual_pipeline_stage:
        vpp = num_layers // (cfg.pipeline_model_parallel_size * cfg.num_layers_per_virtual_pipeline_stage)
    return ParallelConfig(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, vpp,
                          cfg.sequence_parallel, cfg.context_parallel_size)


class Trainer:
    """One fine-tuning run; ``run()`` trains until ``train_iters``, an exit condition or SIGTERM."""

    def __init__(self, cfg: TrainingConfig, log=print):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        cfg.validate()
        self.cfg, self.log = cfg, log
        self.data = SFTIndexedData(cfg.data_path[0])
        vocab = self.data.meta["tokenizer"]["vocab_size"]
        if cfg.valid_data_path:
            self.valid_data = SFTIndexedData(cfg.valid_data_path[0])
            described = [{key: d.meta["tokenizer"][key] for key in ("kind", "vocab_size", "bos_id", "eos_id")}
                         | {"prompt_template": d.meta["prompt_template"]} for d in (self.data, self.valid_data)]
            if described[0] != described[1]:
                raise ValueError(f"--valid-data-path {cfg.valid_data_path[0]} was preprocessed with another tokenizer "
                                 f"or template than --data-path {cfg.data_path[0]}: {described[1]} vs {described[0]}")
            self.train_indices, self.valid_indices = np.arange(len(self.data)), np.arange(len(self.valid_data))
        else:
            self.valid_data = self.data
            self.train_indices, self.valid_indices = split_indices(len(self.data), cfg.split_weights, cfg.seed)
        if cfg.load:
            self.model = model_config_of(cfg.load)
            if self.model.vocab_size < vocab:
                raise ValueError(f"--load {cfg.load}: its vocabulary ({self.model.vocab_size}) is smaller than the data's tokenizer ({vocab})")
        else:
            base = preset(cfg.model)
            self.model = dataclasses.replace(base, vocab_size=vocab, num_layers=cfg.num_layers or base.num_layers,
                                             max_position_embeddings=max(base.max_position_embeddings, cfg.seq_length))
        datasets = [("--data-path", cfg.data_path[0], self.data.meta)]
        if cfg.valid_data_path:
            datasets.append(("--valid-data-path", cfg.valid_data_path[0], self.valid_data.meta))
        checkpoint_root = cfg.save if paths.has_checkpoint(cfg.save) else cfg.load
        check_tokenizers(cfg, datasets, checkpoint_root, log)
        if cfg.seq_length > self.model.max_position_embeddings:
            raise ValueError(f"--seq-length {cfg.seq_length} exceeds the model's {self.model.max_position_embeddings} positions")
        self.parallel = _parallel(cfg, self.model.num_layers)
        validate_layout(self.model, self.parallel)
        if not transformer_engine_available():
            needs_te = {"--fp8-format": cfg.fp8_format, "--sequence-parallel": cfg.sequence_parallel,
                        "--context-parallel-size > 1": cfg.context_parallel_size > 1}
            asked = [flag for flag, value in needs_te.items() if value]
            if asked:
                raise ValueError(f"{', '.join(asked)} need Transformer Engine on a GPU (megatron-core's local "
                                 "CPU layers have no FP8, no sequence-parallel norms and no context-parallel attention)")
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from None
        if cfg.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("--wandb-project needs the wandb package: pip install wandb") from None
        initialize_distributed(self.parallel, seed=cfg.seed)
        self.device = compute_device()
        self._save_lock = None
        if cfg.save:
            self._lock_save(cfg.save)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        # Checked before any model is built: a bad batch shape or checkpoint fails at once.
        self.sampler = GlobalBatchSampler(SampleOrder(len(self.train_indices), cfg.seed), cfg.global_batch_size,
                                          cfg.micro_batch_size, self.dp_rank, self.dp_size)
        # A checkpoint in --save wins over --load: a requeued job reruns the same command line.
        resume = paths.has_checkpoint(cfg.save)
        if resume:
            checkpointing.verify_checkpoint(cfg.save, log)
        if resume and model_config_of(cfg.save) != self.model:
            raise ValueError(
                f"--save {cfg.save} holds a checkpoint of another model ({model_config_of(cfg.save)}); "
                f"this run builds {self.model}"
            )
        self.noise = NoiseConfig(cfg.noise_kind, cfg.noise_alpha, cfg.noise_seed, cfg.noise_pairing)
        if resume:
            self._check_resumed_noise(checkpointing.checkpoint_noise(cfg.save) or {})
        self.train_iters = cfg.train_iters or math.ceil(cfg.train_epochs * len(self.train_indices) / cfg.global_batch_size)

        params_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
        # Weight gradients straight into the DDP buffer: the CPU runtime provides the kernel
        # (apex's is CUDA-only and not a dependency on GPU).
        overrides = {"gradient_accumulation_fusion": is_cpu_only()}
        if cfg.fp8_format:
            overrides.update(fp8=cfg.fp8_format, fp8_recipe=cfg.fp8_recipe)
            if cfg.first_last_layers_bf16:
                overrides.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=cfg.num_layers_at_start_in_bf16,
                                 num_layers_at_end_in_bf16=cfg.num_layers_at_end_in_bf16)
        if cfg.recompute_granularity:
            overrides.update(recompute_granularity=cfg.recompute_granularity)
            if cfg.recompute_granularity == "full":
                overrides.update(recompute_method="uniform", recompute_num_layers=1)
        self.config = make_transformer_config(self.model, self.parallel, params_dtype=params_dtype, **overrides)
        torch.manual_seed(cfg.seed)
        chunks = build_model_chunks(self.model, self.noise, self.config,
                                    make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
        weights_only = cfg.load and (cfg.finetune or paths.read_tracker(cfg.load) is None)
        if weights_only and not resume:
            source = paths.latest_checkpoint_dir(cfg.load)
            load_model_weights(chunks, source)
            log(f"loaded weights from {source} (fine-tuning from iteration 0)")
        if cfg.fp8_format and self.noise.enabled and not cfg.first_last_layers_bf16:
            self._check_fp8_resolution(chunks)
        # As Megatron-LM's get_model: layers megatron-core builds on the host (the local spec's
        # torch norms) join the rest on this rank's GPU.
        chunks = [chunk.to(self.device) for chunk in chunks]
        if cfg.bf16:
            # As Megatron-LM: parameters megatron-core leaves in FP32 (the local spec's torch
            # norms) go to BF16 too, so the mixed-precision optimizer and its checkpoint see one dtype.
            from megatron.core.transformer.module import Float16Module

            chunks = [Float16Module(self.config, chunk) for chunk in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cfg.use_distributed_optimizer)
        self.chunks = [DistributedDataParallel(self.config, ddp_config, chunk) for chunk in chunks]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync
        self.optimizer = build_optimizer(
            OptimizerConfig(optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
                            bf16=cfg.bf16, params_dtype=params_dtype,
                            use_distributed_optimizer=cfg.use_distributed_optimizer),
            self.chunks,
        )
        warmup = int(cfg.lr_warmup_fraction * self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=self.train_iters, lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
            end_wd=cfg.weight_decay, wd_incr_steps=self.train_iters, wd_incr_style="constant",
            override_opt_param_scheduler=cfg.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=cfg.use_checkpoint_opt_param_scheduler,
        )
        self.iteration = 0
        if resume:
            try:
                self.iteration = checkpointing.load_checkpoint(
                    cfg.save, [c.module for c in self.chunks], self.optimizer, self.scheduler, self.sampler)
            except AssertionError as error:  # megatron-core's scheduler asserts on a changed schedule
                if "OptimizerParamScheduler" not in str(error):
                    raise
                raise ValueError(
                    f"--save {cfg.save}: this run's learning-rate schedule differs from the checkpoint's ({error}); "
                    "pass --override-opt-param-scheduler to use this run's, or --use-checkpoint-opt-param-scheduler "
                    "to keep the checkpoint's") from None
            except (ValueError, FileNotFoundError):
                raise
            except Exception as error:  # an unreadable file of a checkpoint without checksums (older runs)
                raise ValueError(
                    f"could not read checkpoint {paths.latest_checkpoint_dir(cfg.save)} ({type(error).__name__}: {error}); "
                    + checkpointing.previous_checkpoint(cfg.save, paths.read_tracker(cfg.save))) from error
            log(f"resumed from {paths.latest_checkpoint_dir(cfg.save)} at iteration {self.iteration}")
        elif cfg.load and cfg.save:
            checkpointing.copy_hf_assets(cfg.load, cfg.save)
        self.pad_id = self.data.meta["tokenizer"].get("eos_id") or 0
        self.writer = None
        if cfg.tensorboard_dir and dist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(cfg.tensorboard_dir)
        self.wandb = None
        if cfg.wandb_project and dist.get_rank() == 0:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=cfg.wandb_save_dir,
                                    config=dataclasses.asdict(cfg))
        self.skipped_iterations = 0
        self._stop_requested = False
        # torchrun starts each worker in its own session: a kill -9 of torchrun alone reaches no
        # worker. A worker sees it as a new parent process and stops (saving, as on SIGTERM).
        self._agent = os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else None
        self._agent_gone = False
        self.history: List[dict] = []

    def _lock_save(self, save: str) -> None:
        """Rank 0 holds --save's lock for the run; every rank stops if another run holds it."""
        error = None
        if dist.get_rank() == 0:
            try:
                self._save_lock = checkpointing.SaveLock(save, self.log)
            except ValueError as refused:
                error = str(refused)
        verdict = [error]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise ValueError(verdict[0])

    def _check_resumed_noise(self, recorded: dict) -> None:
        """As the learning-rate schedule: a resume with other noise settings is refused unless asked for,
        since the next save would record the new settings over the old and hide the change."""
        ours = self.noise.to_dict()
        differing = [f"{NOISE_FLAGS[key]} {ours[key]} (checkpoint: {recorded[key]})"
                     for key in NOISE_FLAGS if key in recorded and recorded[key] != ours[key]]
        if not differing:
            return
        message = f"--save {self.cfg.save}: this run's noise differs from the checkpoint's: {', '.join(differing)}"
        if not self.cfg.override_noise_config:
            raise ValueError(message + "; pass --override-noise-config to train on with this run's settings")
        self.log("WARNING: " + message + " (--override-noise-config: training on with this run's)")

    def close(self) -> None:
        """Let another run take --save (also at exit: the kernel drops the lock with the process)."""
        if getattr(self, "_save_lock", None) is not None:
            self._save_lock.release()
            self._save_lock = None

    def _check_fp8_resolution(self, chunks):
        """Warn when FP8 would swallow the noise at the first layer's inputs (issue-7 analysis,
        on this model's own embedding rows at the data's mean sample length)."""
        from symnoise_megatron.noise.fp8_resolution import check_first_layer

        embeddings = [e for chunk in chunks for e in noisy_embeddings(chunk)]
        if not embeddings or dist.get_rank() != 0:
            return
        mean_length = round(self.data.meta["tokens"] / max(1, self.data.meta["samples"]))
        warning = check_first_layer(embeddings[0].weight, self.cfg.noise_alpha, mean_length, self.cfg.fp8_recipe)
        if warning:
            self.log("WARNING: " + warning)

    # data -------------------------------------------------------------------------------
    def _microbatches(self, groups, indices, data) -> List[MicroBatch]:
        # Sequence parallelism splits the sequence over TP ranks; GPU GEMMs (FP8 above all) want
        # multiples of 16. A CPU needs neither, and every rounded-up position costs compute.
        multiple = (16 if torch.cuda.is_available() else 1) * self.cfg.tensor_model_parallel_size
        return trimmed_to_longest(self._full_length_microbatches(groups, indices, data), multiple)

    def _full_length_microbatches(self, groups, indices, data) -> List[MicroBatch]:
        samples = [[Sample(uid, *data[int(indices[i])]) for uid, i in group] for group in groups]
        if not self.cfg.pack_sequences:
            return [collate(group, self.cfg.seq_length, self.pad_id) for group in samples]
        rows = pack([s for group in samples for s in group], self.cfg.seq_length, self.pad_id)
        size = self.cfg.micro_batch_size
        if self.cfg.pipeline_model_parallel_size > 1:
            # Stages exchange activations of one fixed shape, and the interleaved schedule
            # wants whole groups of micro-batches: fill out with empty rows.
            multiple = size * (self.cfg.pipeline_model_parallel_size if self.cfg.num_layers_per_virtual_pipeline_stage else 1)
            rows += [empty_packed_row(self.cfg.seq_length, self.pad_id) for _ in range(-len(rows) % multiple)]
        return [concatenate(rows[i:i + size]) for i in range(0, len(rows), size)]

    def _run_schedule(self, microbatches: List[MicroBatch], noise: NoiseConfig, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        paired = [mb.to(self.device) for mb in paired_microbatches(microbatches, noise)]
        iterators = [iter(paired) for _ in self.chunks] if len(self.chunks) > 1 else iter(paired)
        seq_length, rows = schedule_shape(self.chunks[0], microbatches[0], noise.rows_per_microbatch(microbatches[0].size))
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iterators, model=self.chunks,
            num_microbatches=noise.microbatches_per_step(len(microbatches)), seq_length=seq_length,
            micro_batch_size=rows, forward_only=forward_only,
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

    # steps ------------------------------------------------------------------------------
    def train_step(self):
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        for chunk in self.chunks:
            chunk.train()
        microbatches = self._microbatches(self.sampler.next_global_batch(), self.train_indices, self.data)
        self.last_step_positions = sum(mb.tokens.numel() for mb in microbatches) * self.noise.copies
        loss_sum, tokens = self._run_schedule(microbatches, self.noise, forward_only=False)
        loss = loss_sum / max(tokens, 1)
        if not math.isfinite(loss):
            if not self.cfg.skip_nonfinite_loss:
                last = paths.latest_checkpoint_dir(self.cfg.save) if paths.has_checkpoint(self.cfg.save) else "none"
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
        if len(self.valid_indices) == 0:
            return None
        for chunk in self.chunks:
            chunk.eval()
        order = SampleOrder(len(self.valid_indices), self.cfg.seed, shuffle=False)
        sampler = GlobalBatchSampler(order, self.cfg.global_batch_size, self.cfg.micro_batch_size, self.dp_rank, self.dp_size)
        loss_sum = tokens = 0.0
        with torch.no_grad():
            for _ in range(self.cfg.eval_iters):
                step_sum, step_tokens = self._run_schedule(
                    self._microbatches(sampler.next_global_batch(), self.valid_indices, self.valid_data), NoiseConfig("none"), True)
                loss_sum, tokens = loss_sum + step_sum, tokens + step_tokens
        return loss_sum / max(tokens, 1)

    def save(self):
        target = checkpointing.save_checkpoint(
            self.cfg.save, self.iteration, [c.module for c in self.chunks], self.optimizer, self.scheduler,
            self.sampler, self.noise, self.model, self.cfg.make_vocab_size_divisible_by)
        self.log(f"saved checkpoint at iteration {self.iteration} to {target}")

    def _install_sigterm(self):
        def request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)

    def _should_stop(self) -> bool:
        if self._agent is not None and os.getppid() != self._agent and not self._agent_gone:
            self._agent_gone = self._stop_requested = True
            print(f"rank {dist.get_rank()}: the torchrun agent (pid {self._agent}) is gone; saving and stopping",
                  file=sys.stderr, flush=True)
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run(self) -> List[dict]:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> List[dict]:
        cfg = self.cfg
        self._install_sigterm()
        started = time.time()
        peak = device_peak_tflops(bool(cfg.fp8_format))
        per_token = self.model.flops_per_token(cfg.seq_length)
        world = dist.get_world_size()
        window_start, window_tokens, window_iterations = time.time(), 0.0, 0
        while self.iteration < self.train_iters:
            loss, grad_norm, tokens, success = self.train_step()
            self.iteration += 1
            window_tokens += self.last_step_positions * self.dp_size
            window_iterations += 1
            record = {"iteration": self.iteration, "loss": loss, "grad_norm": float(grad_norm or 0.0),
                      "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]), "tokens": tokens}
            if cfg.eval_interval and self.iteration % cfg.eval_interval == 0:
                # Validation time is not training time: like Megatron-LM, keep it out of the step timing.
                eval_started = time.time()
                record["validation_loss"] = self.evaluate()
                window_start += time.time() - eval_started
                self.log(f" validation loss at iteration {self.iteration} | lm loss value: {record['validation_loss']:.6E} |")
                self._scalar("validation loss", record["validation_loss"])
            self.history.append(record)
            if self.iteration % cfg.log_interval == 0 or self.iteration == self.train_iters:
                elapsed = time.time() - window_start
                tokens_per_s = window_tokens / elapsed
                tflops = tokens_per_s * per_token / world / 1e12 if peak else None
                scale = max((e.last_noise_scale for c in self.chunks for e in noisy_embeddings(c)), default=0.0)
                self.log(metrics.log_line(
                    self.iteration, self.train_iters, self.sampler.consumed_samples,
                    1000 * elapsed / window_iterations, record["lr"], cfg.global_batch_size, loss,
                    record["grad_norm"], self.skipped_iterations, tokens_per_s, tflops, tflops / peak if tflops else None,
                    scale, metrics.memory_gb()))
                for name, value in (("lm loss", loss), ("learning rate", record["lr"]), ("grad norm", record["grad_norm"]),
                                    ("tokens per second", tokens_per_s), ("noise scale", scale), ("TFLOP/s per GPU", tflops)):
                    self._scalar(name, value)
                window_start, window_tokens, window_iterations = time.time(), 0.0, 0
            stop = self._should_stop()
            out_of_time = cfg.exit_duration_in_mins and (time.time() - started) / 60 >= cfg.exit_duration_in_mins
            exit_now = stop or out_of_time or (cfg.exit_interval and self.iteration % cfg.exit_interval == 0)
            if cfg.save and ((cfg.save_interval and self.iteration % cfg.save_interval == 0) or exit_now
                             or self.iteration == self.train_iters):
                self.save()
            if exit_now:
                reason = ("the torchrun agent is gone" if self._agent_gone else "SIGTERM") if stop else "exit condition"
                self.log(f"exiting at iteration {self.iteration} ({reason})")
                break
        if self.wandb is not None:
            self.wandb.finish()
        return self.history

    def _scalar(self, name, value):
        if value is None:
            return
        if self.writer is not None:
            self.writer.add_scalar(name, value, self.iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({name: value}, step=self.iteration)

