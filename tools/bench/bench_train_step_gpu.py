#!/usr/bin/env python
"""A training step of a LLaMA-2-7B-wide model on one GPU: BF16 and FP8 (delayed, tensorwise,
blockwise scaling), noise none / uniform / symmetric (both pairings), in one run: step time,
tokens/s, TFLOP/s per GPU, MFU, peak memory against the layout planner's estimate.

  python tools/bench/bench_train_step_gpu.py --workdir /tmp/bench_gpu --num-layers auto --seq-length 2048

Random initialisation of the llama2-7b preset with --num-layers layers (``auto``: as many as
the layout planner says fit the card with its heaviest setting), on full rows of --seq-length
tokens (a synthetic instruction file whose answers are longer than a row, preprocessed with
the bundled tokenizer, so no row carries padding), global batch --global-batch-size,
micro-batch 1: the Transformer Engine spec where TE is installed (every --precisions), megatron-core's
local spec otherwise (BF16 rows only; unfused attention). Each setting runs in its own process.
Goals (issues 7, 18): noise under 1% of step time (uniform vs none: the same work); symmetric
processes tokens as fast as none (within 2%), counting both copies; TE BF16 at least 450
TFLOP/s per GPU; FP8 tokens/s at least 1.3x BF16; the planner within 10% of the peak memory.

Rows go to tools/bench/results/te_step_bench.json (and $OUT/te_step_bench.json): one object per
setting with exactly te_results.STEP_BENCH_KEYS, means over --rounds. A setting that fails is
reported at the end and the exit status is 1; the rows of the others are still written.
Without CUDA it prints SKIPPED and exits 0.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import (  # noqa: E402
    PRECISIONS, SKIPPED, device_name, fp8_recipe, merge_rows, read_rows, step_bench_row, write_json,
)

# (noise, pairing); the pairing of a single copy is "none"
SETTINGS = [("none", "none"), ("uniform", "none"), ("symmetric", "concat"), ("symmetric", "microbatch")]


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


def measure(args, prefix, noise_kind, pairing, precision):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from symnoise_megatron.model.builder import transformer_engine_available
    from symnoise_megatron.runtime.hardware import device_peak_tflops
    from symnoise_megatron.runtime.layout_planner import PlanInputs, plan
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    recipe = fp8_recipe(precision)
    config = TrainingConfig.from_flags(
        data_path=[prefix], model="llama2-7b", num_layers=args.num_layers, seq_length=args.seq_length,
        micro_batch_size=1, global_batch_size=args.global_batch_size, train_iters=args.warmup + args.steps,
        lr=1e-5, bf16=True, fp8_format="hybrid" if recipe else None, fp8_recipe=recipe or "delayed",
        noise_kind=noise_kind, noise_alpha=5.0, noise_pairing="concat" if pairing == "none" else pairing,
        eval_interval=None, log_interval=10 ** 6, split="100,0",
    )
    trainer = Trainer(config, log=lambda message: None)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    name = torch.cuda.get_device_name()
    planned = plan(PlanInputs(trainer.model_config, seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                              gpus=1, gpu="H200" if "H200" in name else "H100", fp8=bool(recipe),
                              distributed_optimizer=False, pairing=pairing), 1, 1, 1, 1)
    row = step_bench_row(
        device=device_name(), spec="te" if transformer_engine_available() else "local", precision=precision,
        noise=noise_kind, pairing=pairing, layers=args.num_layers, seq_length=args.seq_length,
        step_s=sorted(times)[len(times) // 2], data_tokens=args.global_batch_size * args.seq_length,
        copies=2 if noise_kind == "symmetric" else 1, flops_per_token=trainer.model_config.flops_per_token(args.seq_length),
        peak_tflops=device_peak_tflops(bool(recipe)), peak_memory_gb=torch.cuda.max_memory_allocated() / 2 ** 30,
        planner_memory_gb=planned.total_gb)
    parallel_state.destroy_model_parallel()
    del trainer
    torch.cuda.empty_cache()
    dist.barrier()
    return row


def layers_that_fit(args) -> int:
    """The most layers (up to the preset's 32) whose planner estimate fits the card under the
    heaviest setting asked for (FP8 adds weight copies, concat doubles the activations)."""
    from symnoise_megatron.model.config import preset
    from symnoise_megatron.runtime.hardware import GPU_MEMORY_GB
    from symnoise_megatron.runtime.layout_planner import USABLE_FRACTION, PlanInputs, plan

    name = torch.cuda.get_device_name()
    gpu = "H200" if "H200" in name else "H100"
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


def run_alone(args, label: str, precision: str, noise_kind: str, pairing: str):
    """One setting in a fresh process: a trainer's memory and compiled kernels do not carry
    over to the next setting (megatron-core keeps global state that no ``del`` releases).
    None when it failed (its output says why)."""
    out = os.path.join(args.workdir, "setting.json")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    command = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--num-layers", str(args.num_layers),
               "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--only", json.dumps([precision, noise_kind, pairing]), "--result", out]
    if subprocess.run(command, env=env).returncode != 0:
        print(f"FAILED: {label} (its output is above)", flush=True)
        return None
    with open(out) as handle:
        return json.load(handle)


def mean_rows(results):
    """The rounds of one setting as one row: numbers averaged, labels kept."""
    first = results[0]
    return {key: (statistics.mean(r[key] for r in results) if isinstance(first[key], float) else first[key])
            for key in first}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_train_step_gpu")
    parser.add_argument("--num-layers", default="8", help="layers of the 7B-wide model, or auto (as many as fit)")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="each setting this many times, interleaved (the spread is the noise)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--settings", nargs="+", default=[f"{n}:{p}" for n, p in SETTINGS],
                        choices=[f"{n}:{p}" for n, p in SETTINGS], help="noise:pairing")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train_step_gpu: SKIPPED, no CUDA device")
        return SKIPPED
    os.makedirs(args.workdir, exist_ok=True)
    args.num_layers = layers_that_fit(args) if args.num_layers == "auto" else int(args.num_layers)
    prefix = synthetic_data(args.workdir, args.seq_length, rows=4 * args.global_batch_size * (args.warmup + args.steps))
    if args.only:
        precision, noise_kind, pairing = json.loads(args.only)
        with open(args.result, "w") as handle:
            json.dump(measure(args, prefix, noise_kind, pairing, precision), handle)
        return 0
    from symnoise_megatron.model.builder import transformer_engine_available

    precisions = args.precisions
    if not transformer_engine_available() and precisions != ["bf16"]:
        print("no Transformer Engine: FP8 rows skipped, local spec (unfused attention)")
        precisions = ["bf16"]
    runs, failed = {}, []
    for round_index in range(args.rounds):
        for precision in precisions:
            for setting in args.settings:
                noise_kind, pairing = setting.split(":")
                label = f"{precision} {noise_kind}" + (f" ({pairing})" if noise_kind == "symmetric" else "")
                row = run_alone(args, label, precision, noise_kind, pairing)
                if row is None:
                    failed.append(f"{label} round {round_index + 1}")
                    continue
                runs.setdefault(label, []).append(row)
                print(label, f"round {round_index + 1}", json.dumps(row), flush=True)
    rows = {label: mean_rows(results) for label, results in runs.items()}
    spread = {label: (max(r["step_s"] for r in results) - min(r["step_s"] for r in results))
              / statistics.mean(r["step_s"] for r in results) for label, results in runs.items()}
    print(f"\n{device_name()}: llama2-7b width, {args.num_layers} layers, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, micro-batch 1, mean over {args.rounds} round(s) of the median of "
          f"{args.steps} steps, {'Transformer Engine' if transformer_engine_available() else 'megatron-core local'} spec\n")
    print("| run | step s | spread | data tokens/s | processed tokens/s | vs none (processed) | TFLOP/s/GPU | MFU | peak memory GB | planner GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        baseline = rows.get(f"{row['precision']} none")
        ratio = f"{row['processed_tokens_per_s'] / baseline['processed_tokens_per_s']:.3f}" if baseline else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        print(f"| {label} | {row['step_s']:.3f} | {spread[label]:.1%} | {row['tokens_per_s']:.0f} | "
              f"{row['processed_tokens_per_s']:.0f} | {ratio} | {row['tflops_per_gpu']:.0f} | {mfu} | "
              f"{row['peak_memory_gb']:.1f} | {row['planner_memory_gb']:.1f} |")
    merged = merge_rows(read_rows("te_step_bench.json"), list(rows.values()))
    print("written:", ", ".join(write_json("te_step_bench.json", merged)))
    if failed:
        print("FAILED settings:", "; ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
