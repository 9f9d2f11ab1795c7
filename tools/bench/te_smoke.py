#!/usr/bin/env python
"""Transformer Engine works on this GPU: a te.Linear forward and backward under FP8 (hybrid,
delayed scaling) against a float32 product, and megatron-core sees TE (``HAVE_TE``).

The check of ../shared/te/tools/device_te_smoke.sh, made loud: any failure exits non-zero,
so tools/bench/device_session.sh skips the stages that need TE. SKIPPED (exit 0) without CUDA.
``--smallest``: the same check on the CPU with torch's Linear in BF16 standing in for TE's
(the dry run: the script's own code runs, TE is not checked).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import add_smallest_flag, stage_device  # noqa: E402

# FP8 E4M3 inputs (3 mantissa bits) on a 4096-long dot product: about 2-4% relative error.
MAX_RELATIVE_ERROR = 0.1


def linear_check(linear, x, autocast) -> tuple:
    """Relative error of ``linear(x)`` against the float32 product, and whether the input gradient
    is finite and non-zero."""
    with autocast():
        y = linear(x)
    y.float().sum().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    reference = x.detach().float() @ linear.weight.detach().float().t()
    error = float((y.detach().float() - reference).norm() / reference.norm())
    grad_ok = x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    return error, grad_ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    device = stage_device("te_smoke", args.smallest, needs_te=False)
    if device is None:
        return 0
    torch.manual_seed(0)
    if device == "cpu":
        import contextlib

        linear = torch.nn.Linear(64, 64, bias=False, dtype=torch.bfloat16)
        x = torch.randn(32, 64, dtype=torch.bfloat16, requires_grad=True)
        error, grad_ok = linear_check(linear, x, contextlib.nullcontext)
        print("dry run (CPU, torch Linear in BF16 for TE's): relative error", error, "input grad finite and non-zero", grad_ok)
        passed, have_te = error < MAX_RELATIVE_ERROR and grad_ok, None
    else:
        print("torch", torch.__version__, torch.version.git_version, "cuda", torch.version.cuda, torch.cuda.get_device_name())
        import transformer_engine as te
        import transformer_engine.pytorch as tep
        from transformer_engine.common.recipe import DelayedScaling, Format

        linear = tep.Linear(4096, 4096, params_dtype=torch.bfloat16).cuda()
        x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        error, grad_ok = linear_check(linear, x, lambda: tep.fp8_autocast(
            enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)))
        print("TE", te.__version__, "fp8 relative error", error, "input grad finite and non-zero", grad_ok)
        from megatron.core.extensions.transformer_engine import HAVE_TE as have_te

        passed = error < MAX_RELATIVE_ERROR and grad_ok and have_te
    print("megatron-core HAVE_TE", have_te if have_te is not None else "(not checked in the dry run)")
    print("te_smoke:", "passed" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
