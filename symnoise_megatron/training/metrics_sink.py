"""Where a run's numbers go: Megatron-LM's console line, TensorBoard, Weights & Biases, and the
throughput window the line reports (validation time kept out of it)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch.distributed as dist

from symnoise_megatron.common.extras import require
from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.runtime.hardware import device_peak_tflops
from symnoise_megatron.training import metrics
from symnoise_megatron.training.arguments import LoggingOptions, TrainingConfig


def check_logging_packages(options: LoggingOptions) -> None:
    """At start, before any work: the packages the logging flags need are installed."""
    if options.tensorboard_dir:
        require("tensorboard", "--tensorboard-dir")
    if options.wandb_project:
        require("wandb", "--wandb-project")


class MetricsSink:
    """Rank 0 writes TensorBoard and W&B; every rank counts the throughput window, ``log`` prints."""

    def __init__(self, config: TrainingConfig, model_config: ModelConfig, log):
        self.options, self.log = config.logging, log
        self.global_batch_size = config.optimizer.global_batch_size
        self.seq_length = config.data.seq_length
        self.fp8 = bool(config.precision.fp8_format)
        self.model_config = model_config
        self.writer = None
        if self.options.tensorboard_dir and dist.get_rank() == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.options.tensorboard_dir)
        self.wandb = None
        if self.options.wandb_project and dist.get_rank() == 0:
            import wandb

            self.wandb = wandb.init(project=self.options.wandb_project, name=self.options.wandb_exp_name,
                                    dir=self.options.wandb_save_dir, config=config.flags())
        self.iteration = 0

    def start(self) -> None:
        """At the start of training: the device's peak, the model's FLOPs per token, an empty window."""
        self.peak = device_peak_tflops(self.fp8)
        self.flops_per_token = self.model_config.flops_per_token(self.seq_length)
        self.world = dist.get_world_size()
        self._open_window()

    def _open_window(self) -> None:
        self.window_start, self.window_tokens, self.window_iterations = time.time(), 0.0, 0

    def count_step(self, iteration: int, positions: int) -> None:
        """One more training step of ``positions`` token positions (all data-parallel ranks)."""
        self.iteration = iteration
        self.window_tokens += positions
        self.window_iterations += 1

    @contextmanager
    def paused(self):
        """Validation time is not training time: like Megatron-LM, keep it out of the step timing."""
        started = time.time()
        try:
            yield
        finally:
            self.window_start += time.time() - started

    def validation(self, loss) -> None:
        self.log(f" validation loss at iteration {self.iteration} | lm loss value: {loss:.6E} |")
        self.scalar("validation loss", loss)

    def log_due(self, train_iters: int) -> bool:
        return self.iteration % self.options.log_interval == 0 or self.iteration == train_iters

    def log_window(self, record: dict, train_iters: int, consumed_samples: int, skipped: int, noise_scale: float) -> None:
        """Megatron-LM's line for the window that ends at this iteration, its scalars, a new window."""
        elapsed = time.time() - self.window_start
        tokens_per_s = self.window_tokens / elapsed
        tflops = tokens_per_s * self.flops_per_token / self.world / 1e12 if self.peak else None
        self.log(metrics.log_line(
            self.iteration, train_iters, consumed_samples, 1000 * elapsed / self.window_iterations, record["lr"],
            self.global_batch_size, record["loss"], record["grad_norm"], skipped, tokens_per_s, tflops,
            tflops / self.peak if tflops else None, noise_scale, metrics.memory_gb()))
        for name, value in (("lm loss", record["loss"]), ("learning rate", record["lr"]), ("grad norm", record["grad_norm"]),
                            ("tokens per second", tokens_per_s), ("noise scale", noise_scale), ("TFLOP/s per GPU", tflops)):
            self.scalar(name, value)
        self._open_window()

    def scalar(self, name, value) -> None:
        if value is None:
            return
        if self.writer is not None:
            self.writer.add_scalar(name, value, self.iteration)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({name: value}, step=self.iteration)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
