#!/usr/bin/env python
"""megatron-to-hf on a model with LLaMA-2-70B's widths: wall time and peak RSS per rank.

  python tools/bench/bench_export.py --workdir /tmp/bench_export --layers 2 --ranks 1 2
  python tools/bench/bench_export.py --smallest     # what CI runs: narrow widths, seconds

Writes a random bf16 HF checkpoint with LLaMA-2-70B's widths (hidden 8192, ffn 28672, 64
heads, 8 KV groups, vocab 32000) and ``--layers`` layers, converts it to megatron-core once,
then times ``tools/convert_checkpoint.py megatron-to-hf`` under torchrun with each rank
count, sampling every rank's resident memory every 50 ms. The goal (issue 27): each rank's
peak stays within twice one layer's tensors (a process holds one layer's tensor at a time;
the embedding and output layer, each smaller than a layer here, are read whole). Every
exported tensor is compared with the original. The estimate for 80 layers takes the start-up
(the same export of the smallest model, timed in the same run) and scales the rest by the
bytes written (the export streams bytes: read, reorder, write).
"""

import argparse
import dataclasses
import os
import shutil
import sys
import time

import psutil
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from symnoise_megatron.checkpoint.layouts import expected_hf_shapes  # noqa: E402
from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader  # noqa: E402
from symnoise_megatron.model.config import preset  # noqa: E402
from tools.bench.bench_convert import timed_torchrun, write_checkpoint  # noqa: E402

GB = 1e9


def bf16_bytes(model, names):
    shapes = expected_hf_shapes(model)
    return sum(torch.Size(shapes[n]).numel() * 2 for n in names)


def layer_bytes(model):
    return bf16_bytes(model, [n for n in expected_hf_shapes(model) if n.startswith("model.layers.0.")])


def same_tensors(original_dir, exported_dir):
    original, exported = HFCheckpointReader(original_dir), HFCheckpointReader(exported_dir)
    if original.names() != exported.names():
        return False
    return all(torch.equal(original.get(name), exported.get(name)) for name in original.names())


def run(model, workdir, ranks_list, keep, smallest=False):
    hf_dir, megatron_dir = os.path.join(workdir, "hf"), os.path.join(workdir, "megatron")
    started = time.perf_counter()
    write_checkpoint(hf_dir, model)
    if smallest:  # the figures mean nothing at this size: CI checks that the export runs and is exact
        ranks_list = ranks_list[-1:]
        if not os.path.exists(os.path.join(megatron_dir, "latest_checkpointed_iteration.txt")):
            from symnoise_megatron.checkpoint.convert import hf_to_megatron
            from symnoise_megatron.runtime.cpu import runtime_for_this_machine

            with runtime_for_this_machine():
                hf_to_megatron(hf_dir, megatron_dir, progress=False)
    elif not os.path.exists(os.path.join(megatron_dir, "latest_checkpointed_iteration.txt")):
        timed_torchrun(["hf-to-megatron", "--load-dir", hf_dir, "--save-dir", megatron_dir], max(ranks_list))
    one_layer = layer_bytes(model)
    total = bf16_bytes(model, expected_hf_shapes(model))
    print(f"{model.num_layers} layers of hidden {model.hidden_size}, ffn {model.ffn_hidden_size}, "
          f"{model.num_attention_heads} heads / {model.query_groups} KV groups, vocab {model.vocab_size} (bf16): "
          f"{total / GB:.2f} GB, one layer {one_layer / GB:.3f} GB; ready in {time.perf_counter() - started:.0f} s; "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.1f}",
          flush=True)
    rows = []
    for ranks in ranks_list:
        seconds, peaks, identical = export(hf_dir, megatron_dir, os.path.join(workdir, f"hf_out_{ranks}"), ranks, keep)
        # The same export of the smallest model: torchrun's start, the imports, the metadata (the part that does not grow with the model).
        start_up = None if smallest else export(*small_model(workdir), os.path.join(workdir, "smallest", "out"), ranks,
                                                keep=False)[0]
        rows.append(dict(ranks=ranks, seconds=seconds, start_up=start_up, peak=max(peaks), identical=identical))
        print(f"ranks {ranks}: {seconds:.1f} s wall" + (f" ({start_up:.1f} s of it start-up, from the smallest model)"
                                                        if start_up is not None else "")
              + f", peak RSS per rank {', '.join(f'{p / GB:.2f}' for p in peaks)} GB = {max(peaks) / one_layer:.2f} x "
              f"one layer (goal <= 2), tensors identical to the original: {identical}", flush=True)
    full = dataclasses.replace(model, num_layers=80)
    scale = bf16_bytes(full, expected_hf_shapes(full)) / total
    for row in rows if not smallest else []:
        estimate = row["start_up"] + (row["seconds"] - row["start_up"]) * scale
        print(f"estimate for 80 layers ({scale * total / GB:.0f} GB) with {row['ranks']} rank(s): {estimate / 60:.0f} min "
              "(start-up, then this run's bytes per second)")
    return rows, one_layer


def export(hf_dir, megatron_dir, out_dir, ranks, keep):
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds, peaks = timed_torchrun(["megatron-to-hf", "--load-dir", megatron_dir, "--save-dir", out_dir], ranks)
    identical = same_tensors(hf_dir, out_dir)
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return seconds, peaks, identical


def small_model(workdir):
    """The smallest model's HF and megatron folders under ``workdir``, made once."""
    hf_dir, megatron_dir = os.path.join(workdir, "smallest", "hf"), os.path.join(workdir, "smallest", "megatron")
    write_checkpoint(hf_dir, smallest_model(2))
    if not os.path.exists(os.path.join(megatron_dir, "latest_checkpointed_iteration.txt")):
        timed_torchrun(["hf-to-megatron", "--load-dir", hf_dir, "--save-dir", megatron_dir], 1)
    return hf_dir, megatron_dir


def smallest_model(layers):
    return dataclasses.replace(preset("llama2-70b", num_layers=layers), hidden_size=256, ffn_hidden_size=896,
                               vocab_size=1000)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_export_70b_widths")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smallest", action="store_true",
                        help="CI's size: 70B's head layout at 1/32 of its widths (hidden 256, ffn 896, vocab 1000), "
                             "exported once with the last of --ranks")
    parser.add_argument("--keep", action="store_true", help="keep the exported folders")
    args = parser.parse_args(argv)
    model = smallest_model(args.layers) if args.smallest else preset("llama2-70b", num_layers=args.layers)
    rows, one_layer = run(model, args.workdir, args.ranks, args.keep, args.smallest)
    return 0 if all(row["identical"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
