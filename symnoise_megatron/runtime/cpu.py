"""Run megatron-core on CPU with the gloo backend (CI, laptops).

megatron-core assumes CUDA in a handful of places that matter for a small model:
factory calls with ``device="cuda"`` or ``torch.cuda.current_device()``, ``Tensor.cuda()``,
``torch.cuda.synchronize()`` in the p2p code, the CUDA RNG tracker that dropout forks (and
activation recomputation saves and restores), and
gradient clipping's check that ``Tensor.type()`` names a CUDA tensor.
:func:`cpu_runtime` redirects exactly those to CPU for as long as it is entered, and gives
megatron-core's gradient-accumulation fusion a host kernel in place of apex's CUDA one.

It is entered explicitly by the launcher when no GPU is present and never on the GPU path:
:func:`cpu_runtime` refuses to start when CUDA is available unless ``force`` is set, so a
GPU job cannot silently run its model on the host.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode

from symnoise_megatron.runtime.wgrad_accumulation import TorchWgradAccumulation

_FACTORY_FUNCTIONS = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint,
    torch.arange, torch.tensor, torch.as_tensor, torch.empty_like, torch.zeros_like,
    torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like, torch.linspace,
    torch.eye, torch.empty_strided,
}


_INTERCEPTED = _FACTORY_FUNCTIONS | {torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to}


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes the integer from torch.cuda.current_device(); on CPU that is "cpu".
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU in factory calls and ``Tensor.to``/``Tensor.cuda``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Every torch call of the step passes here: the common case returns at once.
        if func not in _INTERCEPTED:
            return func(*args, **(kwargs or {}))
        kwargs = dict(kwargs or {})
        if func in _FACTORY_FUNCTIONS and _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        elif func is torch.Tensor.cuda:
            return args[0]
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron's gradient clipping asserts 'torch.cuda.FloatTensor'.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        elif func is torch.Tensor.to:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
        return func(*args, **kwargs)


class _HostStream:
    """Stands in for ``torch.cuda.current_stream()``: megatron-core 0.19's gradient sync waits on
    it for CUDA-graph events before each reduce; on the host every op has already run."""

    def wait_event(self, event=None) -> None:
        pass

    def wait_stream(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _NoForkTracker:
    """Stands in for megatron's CUDA RNG tracker: dropout under ``fork()`` uses the CPU RNG."""

    def __init__(self, tracker):
        self._tracker = tracker

    def __getattr__(self, name):
        return getattr(self._tracker, name)

    @contextlib.contextmanager
    def fork(self, name=None):
        yield


@contextlib.contextmanager
def cpu_runtime(force: bool = False) -> Iterator[None]:
    """Make megatron-core's CUDA assumptions hold on CPU while the context is entered."""
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "cpu_runtime() was entered on a machine with CUDA; the GPU path must not use it "
            "(pass force=True only to test the CPU path on a GPU machine)"
        )
    from megatron.core.tensor_parallel import layers as mcore_layers
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random.initialize_rng_tracker(force_reset=True)
    tracker = _NoForkTracker(mcore_random.get_cuda_rng_tracker())
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.current_device", lambda: "cpu"))
        stack.enter_context(mock.patch("torch.cuda.synchronize", lambda *a, **k: None))
        stack.enter_context(mock.patch("torch.cuda.current_stream", lambda *a, **k: _HostStream()))
        stack.enter_context(
            mock.patch.object(mcore_random, "_CUDA_RNG_STATE_TRACKER", tracker)
        )
        # Activation recomputation saves and restores the CUDA generator's state around each
        # checkpointed forward; on the host the CPU generator (saved beside it) is the only one.
        stack.enter_context(mock.patch.object(mcore_random, "_get_cuda_rng_state", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(mcore_random, "_set_cuda_rng_state", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(mcore_layers, "_grad_accum_fusion_available", True))
        stack.enter_context(mock.patch.object(mcore_layers, "fused_weight_gradient_mlp_cuda", TorchWgradAccumulation,
                                              create=True))
        stack.enter_context(_CudaToCpuMode())
        stack.enter_context(warnings.catch_warnings())
        # A CUDA-stream tuning hint megatron-core repeats for every layer; meaningless on CPU.
        warnings.filterwarnings("ignore", message="When using async grad allreduce")
        yield


def is_cpu_only() -> bool:
    """True where the job must run on CPU with gloo."""
    return not torch.cuda.is_available()


def runtime_for_this_machine():
    """The CPU runtime where there is no GPU, else nothing: how every entry point runs."""
    return cpu_runtime() if is_cpu_only() else contextlib.nullcontext()
