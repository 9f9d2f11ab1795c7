"""What the device stages share: JSON rows later runs compare against (written after each
setting, so a stage cut off by its time limit keeps what it measured), tolerance verdicts, the
symmetric-copy figures of an FP8 cast, and the ``--smallest`` dry run every stage has. Pure
(torch only), so the CPU tests check it; the stages themselves (te_smoke.py, te_step.py,
fp8_noise_te.py, te_parity.py, bench_train_step_gpu.py) measure on the GPU.

``--smallest`` (``DEVICE_DRY_RUN=1 bash tools/bench/device_session.sh``, and CI) runs a stage's
own Python on the CPU at the smallest shapes it can, megatron-core's local spec in place of
Transformer Engine: script errors show before GPU time is spent. Its JSON goes to $OUT only,
never to tools/bench/results/, and says ``"dry_run": true``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import socket
import subprocess
import sys
from typing import Dict, List, Optional

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SKIPPED = 0  # exit status of a stage that cannot run here (no CUDA / no TE): not a failure

STEP_BENCH_KEYS = ("device", "spec", "precision", "noise", "pairing", "options", "layers", "seq_length", "step_s",
                   "tokens_per_s", "processed_tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gb",
                   "planner_memory_gb")
SPECS = ("te", "local")
PRECISIONS = ("bf16", "fp8-delayed", "fp8-tensorwise", "fp8-blockwise")
NOISES = ("none", "uniform", "symmetric")
PAIRINGS = ("none", "concat", "microbatch")
DEFAULT_OPTIONS = "default"  # the fine-tune's own performance defaults


def fp8_recipe(precision: str) -> Optional[str]:
    """The --fp8-recipe of a precision label (None for BF16)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return None if precision == "bf16" else precision.split("-", 1)[1]


def step_bench_row(*, device: str, spec: str, precision: str, noise: str, pairing: str, layers: int, seq_length: int,
                   step_s: float, data_tokens: int, copies: int, flops_per_token: float, peak_tflops: Optional[float],
                   peak_memory_gb: float, planner_memory_gb: float, options: str = DEFAULT_OPTIONS) -> dict:
    """One row of te_step_bench.json: ``data_tokens`` per step (one copy), ``copies`` 2 for symmetric;
    ``options``: the performance setting it ran with (bench_train_step_gpu.PERFORMANCE's name)."""
    if spec not in SPECS or precision not in PRECISIONS or noise not in NOISES or pairing not in PAIRINGS:
        raise ValueError(f"bad row labels: spec {spec!r}, precision {precision!r}, noise {noise!r}, pairing {pairing!r}")
    if (noise == "symmetric") != (pairing != "none") or copies != (2 if noise == "symmetric" else 1):
        raise ValueError(f"noise {noise!r} with pairing {pairing!r} and {copies} copies: symmetric pairs, nothing else does")
    tokens_per_s = data_tokens / step_s
    processed = tokens_per_s * copies
    tflops = processed * flops_per_token / 1e12
    row = dict(device=device, spec=spec, precision=precision, noise=noise, pairing=pairing, options=options, layers=layers,
               seq_length=seq_length, step_s=step_s, tokens_per_s=tokens_per_s, processed_tokens_per_s=processed,
               tflops_per_gpu=tflops, mfu=tflops / peak_tflops if peak_tflops else None,
               peak_memory_gb=peak_memory_gb, planner_memory_gb=planner_memory_gb)
    assert tuple(row) == STEP_BENCH_KEYS
    return row


ROW_KEY = ("device", "spec", "precision", "noise", "pairing", "options", "layers", "seq_length")


def merge_rows(earlier: List[dict], latest: List[dict]) -> List[dict]:
    """``latest`` plus the ``earlier`` rows of settings it did not measure again (one call
    per group of precisions fits the device's time limit; the file keeps them all). Rows from
    before the performance settings existed ran with the defaults."""
    def key(row):
        return tuple(row.get(k, DEFAULT_OPTIONS if k == "options" else None) for k in ROW_KEY)

    measured = {key(r) for r in latest}
    return [r for r in earlier if key(r) not in measured] + list(latest)


def read_rows(name: str) -> List[dict]:
    path = os.path.join(RESULTS_DIR, name)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def check(measured: float, tolerance: float) -> dict:
    """A measured difference against its tolerance; NaN or infinity never passes."""
    measured = float(measured)
    return {"measured": measured, "tolerance": tolerance, "passed": math.isfinite(measured) and measured <= tolerance}


def parity_report(checks: Dict[str, dict], **context) -> dict:
    """te_parity.json: the context (device, versions, command), each check, and ``passed``
    only when every check ran and passed."""
    return {**context, "tolerances": {name: c["tolerance"] for name, c in checks.items()},
            "measured": {name: c["measured"] for name, c in checks.items()}, "checks": checks,
            "passed": bool(checks) and all(c["passed"] for c in checks.values())}


def copies_differ_and_kept(plus: torch.Tensor, minus: torch.Tensor, plus_q: torch.Tensor, minus_q: torch.Tensor):
    """Share of elements where the quantized symmetric copies differ, and the cosine between
    their quantized and their exact difference (as symnoise_megatron.noise.fp8_resolution)."""
    exact = (plus.float() - minus.float()).flatten()
    kept = (plus_q.float() - minus_q.float()).flatten()
    differ = float((plus_q != minus_q).float().mean())
    return differ, float(torch.nn.functional.cosine_similarity(exact, kept, dim=0))


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("megatron.core", "transformer_engine", "triton"):
        try:
            module = __import__(name, fromlist=["__version__"])
            out[name] = getattr(module, "__version__", "?")
        except Exception as error:  # noqa: BLE001 - recorded, not raised: the stage says what ran
            out[name] = f"absent ({type(error).__name__})"
    return out


def device_name() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        return f"{name} (driver {driver})"
    except Exception:  # noqa: BLE001
        return name


def write_json(name: str, payload, out_dir: Optional[str] = None, dry_run: bool = False) -> List[str]:
    """Write ``name`` under tools/bench/results/ and, on the device, under $OUT too (what comes
    back); a dry run writes to $OUT only (its figures are no measurement)."""
    written = []
    for directory in filter(None, [None if dry_run else RESULTS_DIR, out_dir or os.environ.get("OUT")]):
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1)
        written.append(path)
    return written


def add_smallest_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smallest", action="store_true",
                        help="dry run: this stage's Python on the CPU at the smallest shapes, megatron-core's local spec "
                             "in place of Transformer Engine (device_session.sh's DEVICE_DRY_RUN=1 and CI); its "
                             "figures mean nothing and go to $OUT only")


def stage_device(stage: str, smallest: bool, needs_te: bool = True) -> Optional[str]:
    """Where ``stage`` runs: ``cpu`` for a dry run, ``cuda`` where CUDA (and Transformer Engine,
    when ``needs_te``) is present; None after printing why it is SKIPPED (exit status 0)."""
    if smallest:
        if torch.cuda.is_available():
            print(f"{stage}: --smallest is the CPU dry run; this machine has CUDA: run the stage without it")
            return None
        return "cpu"
    reason = needs_cuda_and_te(stage) if needs_te else (None if torch.cuda.is_available() else f"{stage}: SKIPPED, no CUDA device")
    if reason:
        print(reason)
        return None
    return "cuda"


@contextlib.contextmanager
def one_process_group():
    """A one-rank process group's environment (as torchrun's) for a stage run as a plain script,
    and megatron-core's CUDA assumptions redirected where there is no GPU."""
    from symnoise_megatron.runtime.cpu import runtime_for_this_machine

    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with runtime_for_this_machine():
        yield


def release_trainer(trainer) -> None:
    """Let the next setting of a stage start clean in the same process: megatron-core's groups and
    scratch buffers, Transformer Engine's FP8 state, the allocator's cache."""
    import gc

    from megatron.core import parallel_state

    del trainer
    parallel_state.destroy_model_parallel()
    try:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

        FP8GlobalStateManager.reset()
    except Exception:  # noqa: BLE001 - no TE (the dry run), or a TE that keeps it elsewhere
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def needs_cuda_and_te(stage: str) -> Optional[str]:
    """Why ``stage`` cannot run here (printed, exit 0), or None when CUDA and TE are present."""
    if not torch.cuda.is_available():
        return f"{stage}: SKIPPED, no CUDA device"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as error:
        return f"{stage}: SKIPPED, Transformer Engine does not import ({error})"
    return None


def bundled_data(workdir: str, seq_length: int) -> str:
    """The bundled instruction set preprocessed for rows of ``seq_length`` (reused when present)."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    prefix = os.path.join(workdir, f"bundled_{seq_length}")
    if not os.path.exists(prefix + "_tokens.bin"):
        os.makedirs(workdir, exist_ok=True)
        preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                    prompt_template="alpaca", seq_length=seq_length + 1, progress=False))
    return prefix
