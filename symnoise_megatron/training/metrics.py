"""Memory in use and Megatron-LM's log line."""

from __future__ import annotations

import time

import torch


def memory_gb() -> float:
    """Peak GPU memory allocated by this rank, or the process's resident memory on CPU (GB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def log_line(iteration, train_iters, consumed, elapsed_ms, lr, global_batch, loss, grad_norm, skipped,
             tokens_per_s, tflops, mfu, noise_scale, memory=None) -> str:
    """Megatron-LM's ``iteration N/ M | ... | lm loss: X |`` line, with the noise and throughput added."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [
        f" [{stamp}] iteration {iteration:8d}/{train_iters:8d}",
        f"consumed samples: {consumed:12d}",
        f"elapsed time per iteration (ms): {elapsed_ms:.1f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {global_batch:5d}",
        f"lm loss: {loss:.6E}",
        "loss scale: 1.0",
        f"grad norm: {grad_norm:.3f}",
        f"number of skipped iterations: {skipped:3d}",
        f"number of nan iterations: {0:3d}",
        f"tokens per second: {tokens_per_s:.1f}",
    ]
    if tflops is not None:
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {tflops:.1f}")
    if mfu is not None:
        parts.append(f"MFU: {100 * mfu:.1f}%")
    if memory is not None:
        parts.append(f"mem (GB): {memory:.2f}")
    parts.append(f"noise scale: {noise_scale:.3e}")
    return " | ".join(parts) + " |"
