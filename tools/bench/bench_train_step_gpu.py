#!/usr/bin/env python
"""A training step of a LLaMA-2-7B-wide model on one GPU: BF16 and FP8 (delayed, tensorwise,
blockwise scaling), noise none / uniform / symmetric (both pairings): step time, tokens/s,
TFLOP/s per GPU, MFU, peak memory against the layout planner's estimate.

  python tools/bench/bench_train_step_gpu.py --workdir /tmp/bench_gpu --num-layers auto --seq-length 2048 --budget-s 160

Random initialisation of the llama2-7b preset with --num-layers layers (``auto``: as many as
the layout planner says fit the card with its heaviest setting), on full rows of --seq-length
tokens (a synthetic instruction file whose answers are longer than a row, preprocessed with
the bundled tokenizer, so no row carries padding), global batch --global-batch-size,
micro-batch 1: the Transformer Engine spec where TE is installed (every --precisions),
megatron-core's local spec otherwise (BF16 rows only; unfused attention).

Settings run in priority order, all in this process (imports, the build and torch.compile's
warm-up of the fused bias kernels are paid once, and the --warmup steps of each setting stay
out of its timing): BF16 and FP8 tensorwise first, none and symmetric (concat) each; then the
performance settings (issue 26, --performance), each at BF16 symmetric (concat) beside that
default row: static shapes alone, Transformer Engine's CUDA graphs of each layer (static shapes;
captured before the last warm-up step), gradient-accumulation fusion off, the distributed
optimizer with the gradient reduction and parameter all-gather overlapped (one GPU: DP 1, so
this shows their overhead, not their worth), and TP communication overlap (TP 2 with sequence
parallelism: needs two GPUs, left out with the reason on one); then the rest. Calibrated: a setting starts only while the time it is expected to take (the slowest
setting so far, twice that for a symmetric one after single-copy ones) fits what is left of
--budget-s; the settings left out are listed. Goals (issues 7, 18, 24): noise under 1% of step
time (uniform vs none: the same work); symmetric processes tokens as fast as none (within 2%),
counting both copies; TE BF16 at least 450 TFLOP/s per GPU; FP8 tokens/s at least 1.3x BF16;
the planner within 10% of the peak memory.

Rows go to tools/bench/results/te_step_bench.json (and $OUT/te_step_bench.json) after every
setting: one object per setting with exactly te_results.STEP_BENCH_KEYS (``options``: the
performance setting), means over --rounds;
a stage cut off by its time limit keeps the rows it measured. A setting that fails is reported
and the exit status is 1. Without CUDA it prints SKIPPED and exits 0; ``--smallest`` runs the
tiny model on the CPU, local spec, BF16 (the dry run).
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import (  # noqa: E402
    DEFAULT_OPTIONS, PRECISIONS, add_smallest_flag, device_name, fp8_recipe, merge_rows, one_process_group, read_rows,
    release_trainer, stage_device, step_bench_row, synchronize, write_json,
)

# (noise, pairing); the pairing of a single copy is "none"
SETTINGS = [("none", "none"), ("uniform", "none"), ("symmetric", "concat"), ("symmetric", "microbatch")]
# What is measured first: the figures the goals compare (none vs symmetric, BF16 vs FP8).
FIRST = [("bf16", "none", "none"), ("bf16", "symmetric", "concat"), ("fp8-tensorwise", "none", "none"),
         ("fp8-tensorwise", "symmetric", "concat")]


# Performance settings (issue 26): the fine-tune's flags of each, measured at PERFORMANCE_AT beside
# that setting's default row, so that the first GPU call says what each is worth.
PERFORMANCE = {
    "static-shapes": dict(static_shapes=True),
    "cuda-graphs": dict(cuda_graph_impl="transformer_engine"),
    "no-grad-fusion": dict(no_gradient_accumulation_fusion=True),
    "overlap": dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True),
    "tp-overlap": dict(tensor_model_parallel_size=2, sequence_parallel=True, tp_comm_overlap=True),
}
PERFORMANCE_AT = ("bf16", "symmetric", "concat")


def ordered_settings(precisions, settings, performance=()):
    """(precision, noise, pairing, options) in the order they run: FIRST's that were asked for, the
    performance settings (at PERFORMANCE_AT, if its precision was asked for), then the rest."""
    asked = [(p, *s.split(":"), DEFAULT_OPTIONS) for p in precisions for s in settings]
    first = [(*s, DEFAULT_OPTIONS) for s in FIRST if (*s, DEFAULT_OPTIONS) in asked]
    tuned = [(*PERFORMANCE_AT, name) for name in performance] if PERFORMANCE_AT[0] in precisions else []
    return first + tuned + [s for s in asked if s not in first]


def unavailable(options: str, world_size: int) -> str:
    """Why a performance setting cannot run here ("" when it can)."""
    if options == "tp-overlap" and world_size < 2:
        return "needs two GPUs (TP 2 with sequence parallelism); this run has one process"
    if options in ("cuda-graphs", "tp-overlap"):
        from symnoise_megatron.model.builder import transformer_engine_available

        if not (torch.cuda.is_available() and transformer_engine_available()):
            return "needs a GPU with Transformer Engine"
    return ""


def synthetic_data(workdir: str, seq_length: int, rows: int) -> str:
    """Instruction rows whose answers fill more than a row: every row trains on full length."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    prefix = os.path.join(workdir, f"long_{seq_length}")
    if os.path.exists(prefix + "_tokens.bin"):
        return prefix
    with open(BUNDLED_INSTRUCTIONS, encoding="utf-8") as handle:
        bundled = json.load(handle)
    text = " ".join(row["output"] for row in bundled)
    words = text.split()
    repeated = " ".join(words * (1 + 2 * seq_length // max(1, len(words))))
    records = [{"instruction": bundled[i % len(bundled)]["instruction"], "output": repeated} for i in range(rows)]
    path = os.path.join(workdir, "long.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(records, handle)
    preprocess(PreprocessConfig([path], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER), prompt_template="alpaca",
                                seq_length=seq_length + 1, progress=False))
    return prefix


def gpu_kind() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return "H200" if "H200" in name else "H100"


def measure(args, prefix, precision, noise_kind, pairing, options=DEFAULT_OPTIONS):
    """One setting's row: build, --warmup steps, then the median of --steps timed steps."""
    from symnoise_megatron.model.builder import built_with_transformer_engine
    from symnoise_megatron.runtime.hardware import device_peak_tflops
    from symnoise_megatron.runtime.layout_planner import PlanInputs, plan
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    recipe = fp8_recipe(precision)
    performance = dict(PERFORMANCE.get(options, {}))
    if performance.get("cuda_graph_impl"):
        performance["cuda_graph_warmup_steps"] = max(1, args.warmup - 1)  # captured before the last warm-up step
    config = TrainingConfig.from_flags(**performance,
        data_path=[prefix], model=args.model, num_layers=args.num_layers, seq_length=args.seq_length,
        micro_batch_size=1, global_batch_size=args.global_batch_size, train_iters=args.warmup + args.steps,
        lr=1e-5, bf16=True, fp8_format="hybrid" if recipe else None, fp8_recipe=recipe or "delayed",
        noise_kind=noise_kind, noise_alpha=5.0, noise_pairing="concat" if pairing == "none" else pairing,
        eval_interval=None, log_interval=10 ** 6, split="100,0",
    )
    held_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    trainer = Trainer(config, log=lambda message: None)
    times = []
    for step in range(args.warmup + args.steps):
        synchronize()
        started = time.perf_counter()
        trainer.train_step()
        synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    spec = "te" if any(built_with_transformer_engine(chunk) for chunk in trainer.chunks) else "local"
    planned = plan(PlanInputs(trainer.model_config, seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                              gpus=1, gpu=gpu_kind(), fp8=bool(recipe), distributed_optimizer=False, pairing=pairing,
                              spec=spec), 1, 1, 1, 1)
    peak = (torch.cuda.max_memory_allocated() - held_before) / 2 ** 30 if torch.cuda.is_available() else 0.0
    row = step_bench_row(
        device=device_name(), spec=spec, precision=precision, noise=noise_kind, pairing=pairing, options=options,
        layers=args.num_layers, seq_length=args.seq_length, step_s=sorted(times)[len(times) // 2],
        data_tokens=args.global_batch_size * args.seq_length, copies=2 if noise_kind == "symmetric" else 1,
        flops_per_token=trainer.model_config.flops_per_token(args.seq_length), peak_tflops=device_peak_tflops(bool(recipe)),
        peak_memory_gb=peak, planner_memory_gb=planned.total_gb)
    release_trainer(trainer)
    del trainer
    return row


def layers_that_fit(args) -> int:
    """The most layers (up to the preset's 32) whose planner estimate fits the card under the
    heaviest setting asked for (FP8 adds weight copies, concat doubles the activations)."""
    from symnoise_megatron.model.config import preset
    from symnoise_megatron.runtime.hardware import GPU_MEMORY_GB
    from symnoise_megatron.runtime.layout_planner import USABLE_FRACTION, PlanInputs, plan

    gpu = gpu_kind()
    fp8 = any(p != "bf16" for p in args.precisions)
    pairing = "concat" if "symmetric:concat" in args.settings else "microbatch" if "symmetric:microbatch" in args.settings else "none"
    # 10% below the planner's own fit: an out-of-memory setting costs its whole start-up.
    usable = USABLE_FRACTION * GPU_MEMORY_GB[gpu] / 1.1
    fitting = [layers for layers in range(1, 33)
               if plan(PlanInputs(preset("llama2-7b", num_layers=layers, vocab_size=1024), seq_length=args.seq_length,
                                  global_batch_size=args.global_batch_size, gpus=1, gpu=gpu, fp8=fp8,
                                  distributed_optimizer=False, pairing=pairing), 1, 1, 1, 1).total_gb <= usable]
    if not fitting:
        raise SystemExit(f"not even one 7B-wide layer fits a {gpu} at sequence {args.seq_length} by the planner's estimate")
    return max(fitting)


def mean_rows(results):
    """The rounds of one setting as one row: numbers averaged, labels kept."""
    first = results[0]
    return {key: (statistics.mean(r[key] for r in results) if isinstance(first[key], float) else first[key])
            for key in first}


def label_of(precision, noise_kind, pairing, options=DEFAULT_OPTIONS) -> str:
    return (f"{precision} {noise_kind}" + (f" ({pairing})" if noise_kind == "symmetric" else "")
            + (f" [{options}]" if options != DEFAULT_OPTIONS else ""))


def expected_seconds(walls: dict, noise_kind: str) -> float:
    """What the next setting should take, from the settings measured so far: the slowest of its
    kind, or twice the slowest single-copy one for a symmetric setting measured before any."""
    symmetric = [w for (_, n, *_), w in walls.items() if n == "symmetric"]
    single = [w for (_, n, *_), w in walls.items() if n != "symmetric"]
    if noise_kind == "symmetric":
        return max(symmetric) if symmetric else 2 * max(single, default=0.0)
    return max(single) if single else max(symmetric, default=0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_train_step_gpu")
    parser.add_argument("--num-layers", default="8", help="layers of the 7B-wide model, or auto (as many as fit)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="each setting this many times, interleaved (the spread is the noise)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no setting that would not end within this many seconds of the start (default: no limit)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--settings", nargs="+", default=[f"{n}:{p}" for n, p in SETTINGS],
                        choices=[f"{n}:{p}" for n, p in SETTINGS], help="noise:pairing")
    parser.add_argument("--performance", nargs="*", default=list(PERFORMANCE), choices=list(PERFORMANCE),
                        help=f"performance settings measured at {' '.join(PERFORMANCE_AT)} after the goals' rows "
                             "(default: all; none with an empty list)")
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    device = stage_device("bench_train_step_gpu", args.smallest, needs_te=False)
    if device is None:
        return 0
    args.model = "llama2-7b"
    if args.smallest:
        args.model, args.num_layers, args.seq_length, args.global_batch_size = "tiny", "2", 64, 2
        args.steps, args.warmup, args.rounds = 1, 1, 1
    os.makedirs(args.workdir, exist_ok=True)
    with one_process_group():
        return run(args, argv)


def run(args, argv) -> int:
    from symnoise_megatron.model.builder import transformer_engine_available

    started = time.perf_counter()
    args.num_layers = layers_that_fit(args) if args.num_layers == "auto" else int(args.num_layers)
    prefix = synthetic_data(args.workdir, args.seq_length, rows=4 * args.global_batch_size * (args.warmup + args.steps))
    precisions = args.precisions
    if not transformer_engine_available() and precisions != ["bf16"]:
        print("no Transformer Engine: FP8 rows skipped, local spec (unfused attention)")
        precisions = ["bf16"]
    order = ordered_settings(precisions, args.settings, args.performance)
    runs, failed, walls, left_out, cannot_run = {}, [], {}, [], []
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    earlier = [] if args.smallest else read_rows("te_step_bench.json")
    for round_index in range(args.rounds):
        for setting in order:
            label = label_of(*setting)
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and walls and elapsed + expected_seconds(walls, setting[1]) > args.budget_s:
                left_out.append(f"{label} round {round_index + 1}")
                continue
            reason = unavailable(setting[3], world_size)
            if reason:
                if round_index == 0:
                    cannot_run.append(f"{label}: {reason}")
                continue
            setting_started = time.perf_counter()
            try:
                row = measure(args, prefix, *setting)
            except Exception:  # noqa: BLE001 - one setting's failure (say, out of memory) is reported, the rest run
                traceback.print_exc()
                print(f"FAILED: {label} round {round_index + 1} (traceback above)", flush=True)
                failed.append(f"{label} round {round_index + 1}")
                continue
            walls[setting] = max(walls.get(setting, 0.0), time.perf_counter() - setting_started)
            runs.setdefault(label, []).append(row)
            print(label, f"round {round_index + 1}", f"({walls[setting]:.0f} s)", json.dumps(row), flush=True)
            rows = {name: mean_rows(results) for name, results in runs.items()}
            written = write_json("te_step_bench.json", merge_rows(earlier, list(rows.values())), dry_run=args.smallest)
    rows = {name: mean_rows(results) for name, results in runs.items()}
    spread = {name: (max(r["step_s"] for r in results) - min(r["step_s"] for r in results))
              / statistics.mean(r["step_s"] for r in results) for name, results in runs.items()}
    print(f"\n{device_name()}: {args.model} width, {args.num_layers} layers, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, micro-batch 1, mean over {args.rounds} round(s) of the median of "
          f"{args.steps} steps, {'Transformer Engine' if transformer_engine_available() else 'megatron-core local'} spec"
          f"{' (dry run: no measurement)' if args.smallest else ''}\n")
    print("| run | step s | spread | data tokens/s | processed tokens/s | vs none (processed; [options]: vs their default) | "
          "TFLOP/s/GPU | MFU | peak memory GB | planner GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        baseline = rows.get(f"{row['precision']} none")
        if row.get("options", DEFAULT_OPTIONS) != DEFAULT_OPTIONS:  # a performance setting: against its default row
            baseline = rows.get(label_of(row["precision"], row["noise"], row["pairing"]))
        ratio = f"{row['processed_tokens_per_s'] / baseline['processed_tokens_per_s']:.3f}" if baseline else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"| {name} | {row['step_s']:.3f} | {spread[name]:.1%} | {row['tokens_per_s']:.0f} | "
              f"{row['processed_tokens_per_s']:.0f} | {ratio} | {row['tflops_per_gpu']:.0f} | {mfu} | "
              f"{row['peak_memory_gb']:.1f} | {row['planner_memory_gb']:.1f} |")
    if runs:
        print("written:", ", ".join(written))
    if left_out:
        print(f"not measured within --budget-s {args.budget_s:g}: {'; '.join(left_out)}")
    if cannot_run:
        print(f"not measurable here: {'; '.join(cannot_run)}")
    if failed:
        print("FAILED settings:", "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
