#!/usr/bin/env python
"""The host's share of a training step (issue 26): milliseconds per step and per row of building
the micro-batches, before and after the data path moved off the critical path, at the shipped
layouts' batch shapes; and the overlap with a simulated device step.

  nice -n 5 python tools/bench/bench_data_path.py --steps 5 --json tools/bench/results/data_path.json

Batch shapes, per data-parallel rank (one global batch of 128):
- 7b: examples/configs/layouts/llama2-7b.yaml with the data-set recipes' --seq-length 512: DP 8, so
  16 samples, micro-batch 4, the symmetric pair concatenated (each micro-batch runs 8 rows), PP 1;
- 70b: examples/configs/layouts/llama2-70b-fp8-64gpu.yaml at --seq-length 4096 (the issue's): TP 2
  x PP 8 x DP 4, so 32 samples, micro-batch 1, the pair as consecutive micro-batches (64 runs), and
  pipeline ranks of three kinds: the first (embedding: tokens), the middle ones (neither embedding
  nor loss), the last (labels and loss mask).
Samples: synthetic stored sequences (tokens and a loss mask on the last two thirds) whose lengths
are drawn uniformly from a quarter of --seq-length to all of it (seeded), so that rows are long,
as the issue's 4096-token rows; the same samples for both paths.

Paths, each timed on the host (the median of --steps steps, after one warm-up step):
- before (main at e60d2ba3/94b6cdb1): every rank collates every field of the step at --seq-length, cuts
  the rows to the step's longest sample, pairs the copies on the host (``concat`` doubles each
  micro-batch, ``microbatch`` hands the same one over twice) and moves each paired micro-batch
  (``MicroBatch.to``: loss positions and thd segments on the host, then the copy), all before the
  schedule starts;
- after: ``StepBatches.staged`` for the rank's kind (rows built at the step's length, a middle stage
  from the lengths alone) and ``DeviceFeed`` moving each micro-batch once (the pair shares it).
On this CPU the copy itself is a no-op; the bytes each path copies to the device per step are counted.

Overlap: steps of a simulated device step (``time.sleep``, which lets the host thread run, as a GPU
step waiting on its kernels and collectives does) of the planner's estimated step time for the
layout; and, to show the mechanism where it matters, a host step --overlap-scale times the
layout's (so that it is well above the millisecond a thread hand-over and a sleep's overshoot
cost) against a device step of that host time (where the sum would be twice the longer).
Before: host then device in series; after: the next step built by ``Prefetcher`` while the device
sleeps. The wall time per step is reported against the sum and the longer of the two.
``--smallest``: a tiny batch shape and a 10 ms device step (CI runs it; the figures mean nothing).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from symnoise_megatron.data.microbatch import MicroBatch, StagedMicroBatch
from symnoise_megatron.data.sft_dataset import Sample, collate, empty_packed_row, pack
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.training.arguments import TrainingConfig
from symnoise_megatron.training.batches import RankInputs, StepBatches, trimmed_length
from symnoise_megatron.training.device_feed import DeviceFeed
from symnoise_megatron.training.prefetch import Prefetcher

# name: (model preset, seq, samples a rank, micro-batch, pairing, TP, PP, virtual stages, DP, GPUs, FP8)
LAYOUTS = {
    "7b": ("llama2-7b", 512, 16, 4, "concat", 1, 1, None, 8, 8, False),
    "70b": ("llama2-70b", 4096, 32, 1, "microbatch", 2, 8, 2, 4, 64, True),
}
SMALLEST = {"tiny": ("tiny", 64, 4, 2, "concat", 1, 2, None, 1, 2, False)}
KINDS = {"first": RankInputs(targets=False), "middle": RankInputs(tokens=False, targets=False),
         "last": RankInputs(tokens=False), "only": RankInputs()}


class SyntheticSamples:
    """Stored samples as the trainer reads them: (tokens, loss mask) arrays by index (copies, as
    ``SFTIndexedData``), and their stored lengths (the index file's)."""

    def __init__(self, count: int, seq_length: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.lengths = rng.integers(seq_length // 4, seq_length + 2, size=count)
        self.tokens = [rng.integers(3, 32000, size=n).astype(np.int32) for n in self.lengths]
        self.masks = [(np.arange(n) >= n // 3).astype(np.uint8) for n in self.lengths]

    def __getitem__(self, index):
        return np.array(self.tokens[index]), np.array(self.masks[index])

    def sequence_length(self, index):
        return int(self.lengths[index])


def config_for(layout, pack_sequences):
    model, seq, samples, mbs, pairing, tp, pp, vpp, dp, gpus, fp8 = layout
    return TrainingConfig.from_flags(
        data_path=["unused"], train_iters=1, seq_length=seq, micro_batch_size=mbs, global_batch_size=samples * dp,
        pipeline_model_parallel_size=pp, num_virtual_stages_per_pipeline_rank=vpp, pack_sequences=pack_sequences,
        noise_kind="symmetric", noise_pairing=pairing)


def groups_at(step: int, samples: int, mbs: int, count: int):
    """This rank's (uid, index) micro-batch groups of ``step``: consecutive samples, wrapping."""
    uids = range(step * samples, (step + 1) * samples)
    return [[(uid, uid % count) for uid in list(uids)[i:i + mbs]] for i in range(0, samples, mbs)]


# The path before issue 26 ----------------------------------------------------------------------
def before_step(config, groups, data, noise: NoiseConfig, device) -> tuple:
    """Main's host work for one step on every rank: every field at --seq-length, cut, paired on
    the host, each paired micro-batch moved (its extras taken). Returns (runs, bytes copied)."""
    seq, multiple = config.data.seq_length, 1
    samples = [[Sample(uid, *data[index]) for uid, index in group] for group in groups]
    if config.data.pack_sequences:
        rows = pack([s for group in samples for s in group], seq)
        size, pp = config.optimizer.micro_batch_size, config.parallelism.pipeline_model_parallel_size
        if pp > 1:
            multiple_rows = size * (pp if config.parallelism.num_virtual_stages_per_pipeline_rank else 1)
            rows += [empty_packed_row(seq) for _ in range(-len(rows) % multiple_rows)]
        from symnoise_megatron.data.microbatch import concatenate

        microbatches = [concatenate(rows[i:i + size]) for i in range(0, len(rows), size)]
    else:
        microbatches = [collate(group, seq) for group in samples]
    longest = max(int((mb.real_tokens() * torch.arange(1, seq + 1)).max()) for mb in microbatches)
    length = trimmed_length(longest, seq, multiple)
    microbatches = [mb.truncated(length) for mb in microbatches] if length < seq else microbatches
    paired = []
    for mb in microbatches:
        if not noise.is_symmetric:
            paired.append(mb)
        elif noise.pairing == "concat":
            paired.append(mb.doubled())
        else:
            paired += [mb.with_sign(1), mb.with_sign(-1)]
    moved = [mb.to(device) for mb in paired]
    return len(moved), sum(tensor_bytes(mb) for mb in moved)


def tensor_bytes(mb: MicroBatch) -> int:
    tensors = [getattr(mb, name) for name in ("tokens", "labels", "loss_mask", "position_ids", "sample_uids", "lengths",
                                              "loss_positions")]
    if mb.packed_segments is not None:
        tensors += list(mb.packed_segments[:2])
    if isinstance(mb.sign, torch.Tensor):
        tensors.append(mb.sign)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def staged_bytes(staged: StagedMicroBatch) -> int:
    return tensor_bytes(staged.data) + sum(
        t.numel() * t.element_size() for t in ([staged.loss_positions] if staged.loss_positions is not None else [])
        + (list(staged.packed_segments[:2]) if staged.packed_segments is not None else []))


# The path after ---------------------------------------------------------------------------------
def after_batches(config, kind: RankInputs, hidden_size: int) -> StepBatches:
    batches = StepBatches(config, pad_id=0, hidden_size=hidden_size)
    batches.rank = kind
    return batches


def after_step(batches, groups, data, noise, device) -> tuple:
    step = batches.staged(groups, np.arange(len(data.lengths)), data, noise)
    feed = DeviceFeed(step.staged, device)
    runs = list(feed.iterators())
    return len(runs), sum(staged_bytes(s) for s in step.staged)


def timed(function, steps: int):
    """Median seconds of ``function(step)`` over ``steps`` steps after a warm-up, and its last result."""
    function(0)
    times, result = [], None
    for step in range(1, steps + 1):
        started = time.perf_counter()
        result = function(step)
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def planner_step_seconds(layout) -> float:
    from symnoise_megatron.model.config import preset
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.runtime.layout_planner import PlanInputs, plan

    model, seq, samples, mbs, pairing, tp, pp, vpp, dp, gpus, fp8 = layout
    inputs = PlanInputs(preset(model), seq_length=seq, global_batch_size=samples * dp, micro_batch_size=mbs, gpus=gpus,
                        fp8=fp8, pairing=pairing)
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp, sequence_parallel=tp > 1)
    return plan(inputs, tp, pp, 1, dp, parallel=parallel).step_seconds


def overlap(build_serial, build_prefetched, device_seconds: float, steps: int) -> dict:
    """Wall seconds per step: host work then a device step of ``device_seconds`` (before), and the
    next step's host work in a background thread during it (after)."""
    started = time.perf_counter()
    for step in range(steps):
        build_serial(step)
        time.sleep(device_seconds)
    serial = (time.perf_counter() - started) / steps
    prefetcher = Prefetcher(build_prefetched, "bench")
    try:
        prefetcher.get(0, 1)  # the first step's batch: built before the loop starts, as the trainer's first
        started = time.perf_counter()
        for step in range(1, steps + 1):
            prefetcher.get(step, step + 1 if step < steps else None)
            time.sleep(device_seconds)
        prefetched = (time.perf_counter() - started) / steps
    finally:
        prefetcher.close()
    return {"device_s": device_seconds, "serial_step_s": serial, "prefetched_step_s": prefetched}


def bench_layout(name, layout, steps, overlap_steps, pack_sequences, device, smallest, overlap_scale):
    from symnoise_megatron.model.config import preset

    model, seq, samples, mbs, pairing, tp, pp, vpp, dp, gpus, fp8 = layout
    config = config_for(layout, pack_sequences)
    noise = NoiseConfig("symmetric", 5.0, pairing=pairing)
    data = SyntheticSamples(samples * (steps + 2), seq)
    hidden = preset(model).hidden_size
    kinds = ["only"] if pp == 1 else ["first", "middle", "last"]
    rows = {}
    for kind in kinds:
        batches = after_batches(config, KINDS[kind], hidden)
        before_s, (before_runs, before_bytes) = timed(
            lambda step: before_step(config, groups_at(step, samples, mbs, len(data.lengths)), data, noise, device), steps)
        after_s, (after_runs, after_bytes) = timed(
            lambda step: after_step(batches, groups_at(step, samples, mbs, len(data.lengths)), data, noise, device), steps)
        if before_runs != after_runs:
            raise RuntimeError(f"{name} {kind}: {before_runs} micro-batches before, {after_runs} after")
        rows[kind] = {"before_ms": 1e3 * before_s, "after_ms": 1e3 * after_s, "rows": samples,
                      "before_ms_per_row": 1e3 * before_s / samples, "after_ms_per_row": 1e3 * after_s / samples,
                      "runs": after_runs, "before_bytes": before_bytes, "after_bytes": after_bytes}
    # The overlap, on the rank kind with the most host work (every field: the first or only stage).
    kind = KINDS[kinds[0]]
    planned = 0.01 if smallest else planner_step_seconds(layout)
    overlaps = [dict(overlap_of(layout, 1, kind, pack_sequences, noise, hidden, device, planned, steps, overlap_steps),
                     device="planner's step estimate")]
    scaled = overlap_of(layout, overlap_scale, kind, pack_sequences, noise, hidden, device, None, steps, overlap_steps)
    overlaps.append(dict(scaled, device=f"host time of {overlap_scale} x the samples"))
    return {"layout": name, "seq_length": seq, "samples_per_rank": samples, "micro_batch_size": mbs, "pairing": pairing,
            "pipeline": pp, "pack_sequences": pack_sequences, "kinds": rows, "overlap": overlaps}


def overlap_of(layout, scale, kind, pack_sequences, noise, hidden, device, device_seconds, steps, overlap_steps):
    """The overlap of a host step of ``scale`` x the layout's samples with a device step of
    ``device_seconds`` (None: the host step's own median time)."""
    layout = list(layout)
    layout[2] *= scale
    config = config_for(tuple(layout), pack_sequences)
    samples, mbs = layout[2], layout[3]
    data = SyntheticSamples(samples * (max(steps, overlap_steps) + 2), layout[1], seed=1)
    batches = after_batches(config, kind, hidden)

    def serial(step):
        before_step(config, groups_at(step, samples, mbs, len(data.lengths)), data, noise, device)

    def prefetched(step):
        return batches.staged(groups_at(step, samples, mbs, len(data.lengths)), np.arange(len(data.lengths)), data, noise)

    host_s, _ = timed(serial, steps)
    entry = overlap(serial, prefetched, host_s if device_seconds is None else device_seconds, overlap_steps)
    entry.update(host_s=host_s, samples_per_rank=samples)
    return entry


def print_report(results):
    print("| layout | rank | rows | runs | before ms/step | after ms/step | before ms/row | after ms/row | speed-up | "
          "bytes to device before | after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for kind, row in result["kinds"].items():
            print(f"| {result['layout']} seq {result['seq_length']}{' packed' if result['pack_sequences'] else ''} | "
                  f"{kind} | {row['rows']} | {row['runs']} | {row['before_ms']:.1f} | {row['after_ms']:.1f} | "
                  f"{row['before_ms_per_row']:.2f} | {row['after_ms_per_row']:.2f} | "
                  f"{row['before_ms'] / max(row['after_ms'], 1e-9):.2f}x | {row['before_bytes'] / 2**20:.1f} MiB | "
                  f"{row['after_bytes'] / 2**20:.1f} MiB |")
    print()
    print("| layout | simulated device step | samples a rank | host s | device s | before: s/step (host + device) | "
          "after: s/step (prefetched) | after / max(host, device) | after / (host + device) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for result in results:
        for entry in result["overlap"]:
            longer, total = max(entry["host_s"], entry["device_s"]), entry["host_s"] + entry["device_s"]
            print(f"| {result['layout']} | {entry['device']} | {entry['samples_per_rank']} | {entry['host_s']:.3f} | "
                  f"{entry['device_s']:.3f} | "
                  f"{entry['serial_step_s']:.3f} | {entry['prefetched_step_s']:.3f} | "
                  f"{entry['prefetched_step_s'] / longer:.2f} | {entry['prefetched_step_s'] / total:.2f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    parser.add_argument("--overlap-steps", type=int, default=3, help="steps of each overlap run")
    parser.add_argument("--pack-sequences", action="store_true", help="packed rows instead of the layouts' padded rows")
    parser.add_argument("--overlap-scale", type=int, default=16,
                        help="the mechanism's case: a host step of this many times the layout's samples (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the host's data work is one thread's)")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--smallest", action="store_true", help="a tiny shape, 10 ms device steps (CI; no figures)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    layouts = SMALLEST if args.smallest else {name: LAYOUTS[name] for name in args.layouts}
    steps, overlap_steps = (2, 2) if args.smallest else (args.steps, args.overlap_steps)
    scale = 2 if args.smallest else args.overlap_scale
    results = [bench_layout(name, layout, steps, overlap_steps, args.pack_sequences, device, args.smallest, scale)
               for name, layout in layouts.items()]
    print(f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{args.threads} thread(s), device {device}{' (smallest: no figures)' if args.smallest else ''}\n")
    print_report(results)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"command": " ".join(sys.argv), "machine": platform.node(), "cpus": os.cpu_count(),
                       "load": os.getloadavg()[0], "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
