#!/usr/bin/env python
"""A training step of a LLaMA-2-7B-wide model on one GPU: noise none / uniform / symmetric
(both pairings), BF16 and FP8, in one run: step time, tokens/s, TFLOP/s per GPU and MFU.

  python tools/bench/bench_train_step_gpu.py --workdir /tmp/bench_gpu --num-layers 8 --seq-length 2048

Random initialisation of the llama2-7b preset with --num-layers layers (as many as fit),
on full rows of --seq-length tokens (a synthetic instruction file whose answers are longer
than a row, preprocessed with the bundled tokenizer, so no row carries padding), global
batch --global-batch-size, micro-batch 1: the Transformer Engine spec where TE is installed
(BF16 and FP8 rows), megatron-core's local spec otherwise (BF16 rows only; unfused attention).
Goals (issue 7): noise costs under 1% of step time (uniform vs none: the same work), and
symmetric processes tokens as fast as none (within 2%), counting both copies. Also prints the
layout planner's memory estimate beside the measured peak (the planner assumes flash attention,
so it undercounts the local spec's stored attention scores). Needs CUDA.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SETTINGS = [("none", "concat"), ("uniform", "concat"), ("symmetric", "concat"), ("symmetric", "microbatch")]


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


def measure(args, prefix, noise_kind, pairing, fp8):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer
    from symnoise_megatron.training.metrics import PEAK_TFLOPS, flops_per_token

    config = TrainingConfig(
        data_path=[prefix], model="llama2-7b", num_layers=args.num_layers, seq_length=args.seq_length,
        micro_batch_size=1, global_batch_size=args.global_batch_size, train_iters=args.warmup + args.steps,
        lr=1e-5, bf16=True, fp8_format="hybrid" if fp8 else None, fp8_recipe=args.fp8_recipe,
        noise_kind=noise_kind, noise_alpha=5.0, noise_pairing=pairing, eval_interval=None, log_interval=10 ** 6,
        split="100,0",
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
    seconds = sorted(times)[len(times) // 2]
    copies = 2 if noise_kind == "symmetric" else 1
    processed = args.global_batch_size * args.seq_length * copies / seconds
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK_TFLOPS.items() if key in name), None)
    peak = peak * (2 if fp8 else 1) if peak else None
    tflops = processed * flops_per_token(trainer.model, args.seq_length) / 1e12
    memory = torch.cuda.max_memory_allocated() / 2 ** 30
    from symnoise_megatron.runtime.layout_planner import PlanInputs, plan

    planned = plan(PlanInputs(trainer.model, seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                              gpus=1, gpu="H200" if "H200" in name else "H100", fp8=fp8, distributed_optimizer=False,
                              pairing=pairing if noise_kind == "symmetric" else "none"), 1, 1, 1, 1)
    parallel_state.destroy_model_parallel()
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    return {"step_s": seconds, "data_tokens_per_s": processed / copies, "processed_tokens_per_s": processed,
            "tflops": tflops, "mfu": tflops / peak if peak else None, "memory_gb": memory,
            "planned_memory_gb": planned.total_gb}


def run_alone(args, label: str, fp8: bool, noise_kind: str, pairing: str) -> dict:
    """One setting in a fresh process: a trainer's memory and compiled kernels do not carry
    over to the next setting (megatron-core keeps global state that no ``del`` releases)."""
    out = os.path.join(args.workdir, "setting.json")
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29500 + os.getpid() % 1000))
    command = [sys.executable, os.path.abspath(__file__), "--workdir", args.workdir, "--num-layers", str(args.num_layers),
               "--seq-length", str(args.seq_length), "--global-batch-size", str(args.global_batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--fp8-recipe", args.fp8_recipe,
               "--only", json.dumps([fp8, noise_kind, pairing]), "--result", out]
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"{label} failed (its output is above)")
    with open(out) as handle:
        return json.load(handle)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_train_step_gpu")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="each setting this many times, interleaved (the spread is the noise)")
    parser.add_argument("--fp8-recipe", default="tensorwise", choices=["delayed", "tensorwise", "blockwise"])
    parser.add_argument("--no-fp8", action="store_true")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    os.makedirs(args.workdir, exist_ok=True)
    prefix = synthetic_data(args.workdir, args.seq_length, rows=4 * args.global_batch_size * (args.warmup + args.steps))
    if args.only:
        fp8, noise_kind, pairing = json.loads(args.only)
        with open(args.result, "w") as handle:
            json.dump(measure(args, prefix, noise_kind, pairing, fp8), handle)
        return 0
    from symnoise_megatron.model.builder import transformer_engine_available

    with_te = transformer_engine_available()
    if not with_te and not args.no_fp8:
        print("no Transformer Engine: FP8 rows skipped, local spec (unfused attention)")
    runs = {}
    for round_index in range(args.rounds):
        for fp8 in ([False] if args.no_fp8 or not with_te else [False, True]):
            for noise_kind, pairing in SETTINGS:
                label = f"{'FP8' if fp8 else 'BF16'} {noise_kind}" + (f" ({pairing})" if noise_kind == "symmetric" else "")
                runs.setdefault(label, []).append(run_alone(args, label, fp8, noise_kind, pairing))
                print(label, f"round {round_index + 1}", json.dumps(runs[label][-1]), flush=True)
    rows = {label: {key: statistics.mean(r[key] for r in results) for key in results[0] if results[0][key] is not None}
            | {"step_s_spread": (max(r["step_s"] for r in results) - min(r["step_s"] for r in results))
               / statistics.mean(r["step_s"] for r in results)}
            for label, results in runs.items()}
    print(f"\n{torch.cuda.get_device_name()}: llama2-7b width, {args.num_layers} layers, seq {args.seq_length}, "
          f"global batch {args.global_batch_size}, micro-batch 1, mean over {args.rounds} rounds of the median of "
          f"{args.steps} steps, {'Transformer Engine' if with_te else 'megatron-core local'} spec\n")
    print("| run | step s | spread | data tokens/s | processed tokens/s | vs none (processed) | TFLOP/s/GPU | MFU | memory GB | planned GB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, row in rows.items():
        baseline = rows[label.split()[0] + " none"]
        print(f"| {label} | {row['step_s']:.3f} | {row['step_s_spread']:.1%} | {row['data_tokens_per_s']:.0f} | "
              f"{row['processed_tokens_per_s']:.0f} | {row['processed_tokens_per_s'] / baseline['processed_tokens_per_s']:.3f} | "
              f"{row['tflops']:.0f} | {row.get('mfu', float('nan')):.1%} | {row['memory_gb']:.1f} | {row['planned_memory_gb']:.1f} |")
    with open(os.path.join(args.workdir, "results.json"), "w") as handle:
        json.dump(runs, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
