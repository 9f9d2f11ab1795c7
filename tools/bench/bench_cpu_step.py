#!/usr/bin/env python
"""A SmolLM2-135M training step on CPU: this stack under several layouts against transformers
with NEFTune, on the same samples, in one run.

  python tools/bench/bench_cpu_step.py --workdir /tmp/bench_step --steps 4 --warmup 1 --layouts tp1 --rounds 3

Both sides take the same global batches (the trainer's seeded order over the bundled set,
preprocessed with SmolLM2's tokenizer and ChatML), compute the same loss (response tokens)
and take a fused AdamW step in fp32. This stack pads each micro-batch's rows to the step's longest
sample (or packs rows with --pack-sequences; megatron-core local spec on CPU, gloo);
transformers pads each batch to its longest sample and adds NEFTune's uniform noise through
its own hook. Throughput counts real
(non-padding) data tokens, so packing and padding waste count against whichever side has
them. The first --warmup steps are not timed. `uniform` is the like-for-like row (NEFTune);
`symmetric` runs both copies of every sample, twice the work per data token. A row whose
process fails stops the bench with that process's last lines of output. ``--smallest``: a tiny
random LLaMA with the bundled tokenizer (tools/make_tiny_llama.py) in place of SmolLM2, one
round of one step, TP 1, uniform, two short samples (CI runs it: the bench keeps working).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

LAYOUTS = {  # name: (tensor parallel, pipeline parallel)
    "tp1": (1, 1),
    "tp1_pp2": (1, 2),
    "tp3": (3, 1),
}


def prepare(workdir, smallest=False):
    """SmolLM2 (HF and converted) and the bundled set preprocessed for it; reused when present.
    ``smallest``: a tiny random LLaMA with the bundled SentencePiece tokenizer instead."""
    from symnoise_megatron.checkpoint.gguf import materialize
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    name = "tiny" if smallest else "smollm2"
    if smallest:
        hf_dir = os.path.join(workdir, "tiny-hf")
        if not os.path.exists(os.path.join(hf_dir, "config.json")):
            subprocess.run([sys.executable, "tools/make_tiny_llama.py", "--save-dir", hf_dir, "--hidden-size", "64",
                            "--num-layers", "2"], check=True, stdout=subprocess.DEVNULL)
    else:
        hf_dir = materialize("smollm2-135m-instruct", os.environ.get("SYMNOISE_CACHE") or os.path.join(workdir, "cache"))
    megatron_dir, prefix = os.path.join(workdir, f"{name}-megatron"), os.path.join(workdir, "data", f"bundled_{name}")
    if not os.path.exists(prefix + "_tokens.bin"):
        preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(directory=hf_dir),
                                    prompt_template="alpaca" if smallest else "chatml", seq_length=257, progress=False))
    if not os.path.exists(os.path.join(megatron_dir, "latest_checkpointed_iteration.txt")):
        subprocess.run([sys.executable, "tools/convert_checkpoint.py", "hf-to-megatron", "--load-dir", hf_dir,
                        "--save-dir", megatron_dir, "--no-progress"], check=True)
    return hf_dir, megatron_dir, prefix


def training_config(args, megatron_dir, prefix, noise_kind, tp=1, pp=1):
    from symnoise_megatron.training.arguments import TrainingConfig

    return TrainingConfig.from_flags(
        data_path=[prefix], load=megatron_dir, finetune=True, tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp, micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        seq_length=args.seq_length, pack_sequences=args.pack_sequences, train_iters=args.warmup + args.steps, lr=1e-5,
        lr_warmup_fraction=0.0, noise_kind=noise_kind, noise_alpha=5.0, eval_interval=None, log_interval=10 ** 6,
    )


def real_tokens(microbatches):
    return int(sum(mb.real_tokens().sum() for mb in microbatches))


def worker(args):
    """Inside torchrun: time this stack's steps; rank 0 writes the figures as JSON."""
    import torch.distributed as dist

    from symnoise_megatron.runtime.cpu import runtime_for_this_machine
    from symnoise_megatron.training.loop import Trainer

    tp, pp = LAYOUTS[args.layout]
    with runtime_for_this_machine():
        trainer = Trainer(training_config(args, args.megatron_dir, args.data_prefix, args.noise_kind, tp, pp), log=lambda m: None)
        counted = []
        build = trainer.batches.staged

        def counting(groups, indices, data, noise):
            step = build(groups, indices, data, noise)
            counted.append(real_tokens([staged.data for staged in step.staged]))
            return step

        trainer.batches.staged = counting  # every step's batches are built here (ahead, by the prefetcher)
        times, losses = [], []
        for _ in range(args.warmup + args.steps):
            dist.barrier()
            started = time.perf_counter()
            loss, *_ = trainer.train_step()
            dist.barrier()
            times.append(time.perf_counter() - started)
            losses.append(loss)
        timed = slice(args.warmup, None)
        tokens = sum(counted[timed])  # every rank builds the whole global batch: one replica, no data parallelism
        if dist.get_rank() == 0:
            with open(args.result, "w") as handle:
                json.dump({"seconds": sum(times[timed]), "steps": args.steps, "tokens": float(tokens), "losses": losses}, handle)


def transformers_reference(args, hf_dir, prefix):
    """The same global batches through transformers with NEFTune's hook and AdamW."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations.neftune import activate_neftune

    from symnoise_megatron.data.sampler import GlobalBatchSampler, SampleOrder
    from symnoise_megatron.data.sft_dataset import SFTIndexedData, split_indices

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    activate_neftune(model, 5.0)  # transformers' own hook, as its Trainer installs it
    # transformers' Trainer defaults to torch's fused AdamW (optim="adamw_torch_fused") with torch >= 2.8.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)
    config = training_config(args, None, prefix, "uniform")
    data = SFTIndexedData(prefix)
    seed = config.optimizer.seed
    train, _, _ = split_indices(len(data), config.data.split_weights, seed)
    sampler = GlobalBatchSampler(SampleOrder(len(train), seed), config.optimizer.global_batch_size,
                                 config.optimizer.micro_batch_size)
    pad = data.meta["tokenizer"]["eos_id"]
    times, tokens, losses = [], 0, []
    for step in range(args.warmup + args.steps):
        started = time.perf_counter()  # the trainer's step builds its batch too
        samples = [data[int(train[index])] for group in sampler.next_global_batch() for _, index in group]
        samples = [(ids[: args.seq_length + 1], mask[: args.seq_length + 1]) for ids, mask in samples]
        width = max(len(ids) for ids, _ in samples) - 1
        inputs = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), -100, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        for row, (ids, mask) in enumerate(samples):
            ids, mask = torch.from_numpy(ids.astype("int64")), torch.from_numpy(mask.astype("bool"))
            n = len(ids) - 1
            inputs[row, :n], attention[row, :n] = ids[:-1], 1
            labels[row, :n] = torch.where(mask[1:], ids[1:], torch.tensor(-100))
        logits = model(input_ids=inputs, attention_mask=attention).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        if step >= args.warmup:
            times.append(elapsed)
            tokens += int(attention.sum())
        losses.append(float(loss.detach()))
    return {"seconds": sum(times), "steps": args.steps, "tokens": tokens, "losses": losses}


REFERENCE = "transformers"
SMALLEST = dict(steps=1, warmup=0, rounds=1, layouts=["tp1"], noise_kinds=["uniform"], global_batch_size=2,
                micro_batch_size=2, seq_length=64, threads=1)


def run_row(args, layout, noise_kind, hf_dir, megatron_dir, prefix):
    """One row in its own process (the reference too: same start, same thread count)."""
    tp, pp = LAYOUTS.get(layout, (1, 1))
    result = os.path.join(args.workdir, f"{layout}_{noise_kind}.json")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, args.threads // (tp * pp))))
    launcher = [sys.executable] if layout == REFERENCE else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp * pp)]
    command = launcher + [__file__, "--worker", "--layout", layout, "--noise-kind", noise_kind, "--hf-dir", hf_dir,
                          "--megatron-dir", megatron_dir, "--data-prefix", prefix, "--result", result] + forwarded(args)
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-25:])
        raise SystemExit(f"{tail}\nbench_cpu_step: the {layout} {noise_kind} row failed (exit {done.returncode}); "
                         f"its last lines are above")
    with open(result) as handle:
        return json.load(handle)


def forwarded(args):
    return ["--steps", str(args.steps), "--warmup", str(args.warmup), "--global-batch-size", str(args.global_batch_size),
            "--micro-batch-size", str(args.micro_batch_size), "--seq-length", str(args.seq_length),
            *(["--pack-sequences"] if args.pack_sequences else []),
            "--threads", str(args.threads)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_cpu_step")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=8,
                        help="default: the whole global batch in one pass, as the reference takes it")
    parser.add_argument("--pack-sequences", action="store_true", help="pack rows (default: one sample per row, "
                        "padded to the step's longest, as transformers pads a batch)")
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads per row, split over its ranks")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--noise-kinds", nargs="+", default=["uniform", "symmetric"], choices=["uniform", "symmetric"])
    parser.add_argument("--rounds", type=int, default=3, help="every row this many times, interleaved")
    parser.add_argument("--smallest", action="store_true",
                        help="a tiny random LLaMA instead of SmolLM2 and, for the options not given, one round of one "
                             "step (no warm-up), TP 1, uniform noise, global batch 2 of rows of 64 (CI runs it; the "
                             "figures mean nothing)")
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--noise-kind", help=argparse.SUPPRESS)
    parser.add_argument("--megatron-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smallest:  # the smallest value of every option left at its default
        for name, value in SMALLEST.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    if args.worker:
        if args.layout == REFERENCE:
            with open(args.result, "w") as handle:
                json.dump(transformers_reference(args, args.hf_dir, args.data_prefix), handle)
        else:
            worker(args)
        return 0
    os.makedirs(args.workdir, exist_ok=True)
    hf_dir, megatron_dir, prefix = prepare(args.workdir, args.smallest)
    rows = [("transformers + NEFTune (uniform 5)", REFERENCE, "uniform")] + [
        (f"symnoise-megatron {layout}, {kind} 5", layout, kind) for layout in args.layouts for kind in args.noise_kinds]
    runs = {name: [] for name, _, _ in rows}
    for round_index in range(args.rounds):  # interleaved: a slow spell of the machine hits every row alike
        for name, layout, kind in rows:
            runs[name].append(run_row(args, layout, kind, hf_dir, megatron_dir, prefix))
            print(f"round {round_index + 1}: {name}: {runs[name][-1]['seconds'] / args.steps:.2f} s/step", flush=True)
    reference = runs[rows[0][0]]
    print(f"\n{'tiny random LLaMA (smallest mode)' if args.smallest else 'SmolLM2-135M'}, fp32, {os.cpu_count()} CPU cores, {args.threads} threads per row, global batch "
          f"{args.global_batch_size}, micro-batch {args.micro_batch_size}, "
          f"{'packed' if args.pack_sequences else 'padded'} rows, {args.steps} timed steps after {args.warmup} "
          f"warm-up, seq {args.seq_length}, {args.rounds} interleaved rounds (medians; ratio per round against "
          f"the same round's reference, min-max)\n")
    print("| run | s/step | data tokens/s | vs transformers + NEFTune | ratio range |")
    print("|---|---|---|---|---|")
    for name, results in runs.items():
        ratios = [(r["tokens"] / r["seconds"]) / (ref["tokens"] / ref["seconds"]) for r, ref in zip(results, reference)]
        print(f"| {name} | {statistics.median(r['seconds'] / r['steps'] for r in results):.2f} | "
              f"{statistics.median(r['tokens'] / r['seconds'] for r in results):.0f} | {statistics.median(ratios):.2f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")
    with open(os.path.join(args.workdir, "results.json"), "w") as handle:
        json.dump(runs, handle, indent=1)
    return 0

if __name__ == "__main__":
    sys.exit(main())
