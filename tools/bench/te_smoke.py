#!/usr/bin/env python
"""Transformer Engine works on this GPU: a te.Linear forward and backward under FP8 (hybrid,
delayed scaling) against a float32 product, and megatron-core sees TE (``HAVE_TE``).

The check of ../shared/te/tools/device_te_smoke.sh, made loud: any failure exits non-zero,
so tools/bench/device_session.sh skips the stages that need TE. SKIPPED (exit 0) without CUDA.
"""

import sys

import torch

# FP8 E4M3 inputs (3 mantissa bits) on a 4096-long dot product: about 2-4% relative error.
MAX_RELATIVE_ERROR = 0.1


def main() -> int:
    if not torch.cuda.is_available():
        print("te_smoke: SKIPPED, no CUDA device")
        return 0
    print("torch", torch.__version__, torch.version.git_version, "cuda", torch.version.cuda, torch.cuda.get_device_name())
    import transformer_engine as te
    import transformer_engine.pytorch as tep
    from transformer_engine.common.recipe import DelayedScaling, Format

    torch.manual_seed(0)
    linear = tep.Linear(4096, 4096, params_dtype=torch.bfloat16).cuda()
    x = torch.randn(2048, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with tep.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
        y = linear(x)
    y.float().sum().backward()
    torch.cuda.synchronize()
    reference = x.detach().float() @ linear.weight.detach().float().t()
    error = float((y.float() - reference).norm() / reference.norm())
    grad_ok = x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    print("TE", te.__version__, "fp8 relative error", error, "input grad finite and non-zero", grad_ok)
    from megatron.core.extensions.transformer_engine import HAVE_TE

    print("megatron-core HAVE_TE", HAVE_TE)
    if not (error < MAX_RELATIVE_ERROR and grad_ok and HAVE_TE):
        print("te_smoke: FAILED")
        return 1
    print("te_smoke: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
