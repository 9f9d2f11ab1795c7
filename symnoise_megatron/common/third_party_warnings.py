"""The third-party warnings a run prints that tell its user nothing, filtered once where the package starts.

Each known warning is named by its category, the module it is attributed to and the start of its
message (a log record: by its logger and the start of its message), with why it is known. Every
other warning stays as visible as Python, ``-W`` or ``PYTHONWARNINGS`` make it: the filters are
added for these and nothing else. ``symnoise_megatron/__init__.py`` calls :func:`install`, so every
entry point (the commands, each torchrun rank, ``tools/*.py``) has them before megatron-core loads.

They differ by megatron-core release (0.16.1 on Python 3.11, 0.19.x on 3.12); an entry for a
warning one release does not print filters nothing there.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Tuple, Type

# Warnings raised inside a torch call that the CPU runtime's TorchFunctionMode passes on are
# attributed to that mode's frame (symnoise_megatron.runtime.cpu) instead of the caller's.
_TORCH_CALLERS = r"(megatron\.core|torch|symnoise_megatron\.runtime\.cpu)(\.|$)"


@dataclass(frozen=True)
class KnownWarning:
    category: Type[Warning]
    module: str  # regular expression for the module the warning is attributed to
    message: str  # the message's start (a regular expression, as warnings.filterwarnings takes it)
    why: str


@dataclass(frozen=True)
class KnownLogRecord:
    logger: str  # the logger's exact name
    message: str  # the message's start
    why: str


KNOWN_WARNINGS: Tuple[KnownWarning, ...] = (
    KnownWarning(UserWarning, r"megatron\.core\.", "Apex is not installed",
                 "megatron-core falls back to torch's norms without Apex: always so on CPU; the GPU path uses "
                 "Transformer Engine's"),
    KnownWarning(UserWarning, r"megatron\.core\.", "Transformer Engine and Apex are not installed",
                 "megatron-core's torch fallbacks for its optimizer and fused kernels: always so on CPU"),
    KnownWarning(UserWarning, r"megatron\.core\.models\.mimo\.", "MimoModelConfig is experimental",
                 "megatron-core 0.19 imports its multimodal model whether or not it is used"),
    KnownWarning(DeprecationWarning, r"megatron\.core\.", "The following imports from `dynamic_context.py`",
                 "megatron-core's own inference package, imported by its optimizer"),
    KnownWarning(DeprecationWarning, r"megatron\.core\.",
                 "The 'megatron.core.transformer.custom_layers.transformer_engine'",
                 "megatron-core 0.16 imports its own deprecated module"),
    KnownWarning(FutureWarning, _TORCH_CALLERS, "Please use DTensor instead and we are deprecating ShardedTensor",
                 "megatron-core's torch_dist checkpoints are built from torch's ShardedTensor"),
    KnownWarning(FutureWarning, r"megatron\.core\.dist_checkpointing\.", "`load_state_dict` is deprecated",
                 "megatron-core 0.16's torch_dist reader calls torch's former name for load"),
    KnownWarning(UserWarning, r"torch\.distributed\.checkpoint\.", "The argument order of load has been changed",
                 "megatron-core 0.19's one-process read of a checkpoint's common state"),
    KnownWarning(UserWarning, r"torch\.distributed\.checkpoint\.", "torch.distributed is disabled, unavailable or "
                 "uninitialized, assuming the intent is to load in a single process",
                 "one-process reads of a checkpoint's common state (megatron-core 0.19, and its reader here under 0.16)"),
    KnownWarning(FutureWarning, r"torch\.distributed\.", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
                 "megatron-core's distributed optimizer calls torch's former names for these collectives"),
)

KNOWN_LOG_RECORDS: Tuple[KnownLogRecord, ...] = (
    KnownLogRecord("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
                   "megatron-core 0.19 deprecates GPTModel for HybridModel; the package builds GPTModel on purpose "
                   "(docs/architecture.md says what moving would take)"),
    KnownLogRecord("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated",
                   "megatron-core 0.19 logs it for every synchronous save too; the package's saves are synchronous"),
    KnownLogRecord("megatron.core.dist_checkpointing.strategies.common", "load_common is deprecated",
                   "megatron-core 0.19 reading a checkpoint saved by 0.16 (its common.pt): the format it reads on purpose"),
    KnownLogRecord("torch.utils.cpp_extension", "No CUDA runtime is found",
                   "PyPI's CUDA build of torch (the Python 3.12 leg) on a machine without a GPU"),
)


class _DropKnownRecords(logging.Filter):
    def __init__(self, starts: Tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


_installed = False


def install() -> None:
    """Add the filters for the known warnings and log records (once per process)."""
    global _installed
    if _installed:
        return
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category, module=known.module)
    by_logger = {}
    for known in KNOWN_LOG_RECORDS:
        by_logger.setdefault(known.logger, []).append(known.message)
    for name, starts in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnownRecords(tuple(starts)))
    _installed = True
