#!/usr/bin/env python
"""Conversion of a LLaMA-2-7B-shaped random bf16 checkpoint: wall time and peak RSS per rank.

  python tools/bench/bench_convert.py --workdir /tmp/bench7b --ranks 1 4

Writes the HF checkpoint once (13.5 GB in 2 shards, random bf16, LLaMA-2-7B names and
shapes) and times `tools/convert_checkpoint.py hf-to-megatron` under torchrun with each rank
count, sampling the resident memory of every rank every 50 ms. The goal (issue 4): under 3
minutes and under 4 GB peak RSS on a 2-core machine. ``--smallest``: the tiny preset's shapes,
one rank (CI runs it; the figures mean nothing).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import torch
from safetensors.torch import save_file

from symnoise_megatron.checkpoint.hf_config import hf_config_from_model
from symnoise_megatron.checkpoint.layouts import expected_hf_shapes
from symnoise_megatron.model.config import preset


def write_checkpoint(directory, model=None):
    """A random bf16 HF checkpoint of ``model``'s names and shapes (default LLaMA-2-7B) in 2 shards."""
    model = model or preset("llama2-7b")
    if os.path.exists(os.path.join(directory, "model.safetensors.index.json")):
        return model
    os.makedirs(directory, exist_ok=True)
    shapes = expected_hf_shapes(model)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for index, part in enumerate(halves):
        filename = f"model-{index + 1:05d}-of-00002.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=generator, dtype=torch.float32) * 0.02).to(torch.bfloat16) for n in part}
        save_file(tensors, os.path.join(directory, filename), metadata={"format": "pt"})
        weight_map.update({n: filename for n in part})
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle)
    with open(os.path.join(directory, "config.json"), "w") as handle:
        json.dump(hf_config_from_model(model), handle)
    return model


def timed_torchrun(arguments, ranks):
    """``tools/convert_checkpoint.py ARGUMENTS`` under torchrun with ``ranks`` ranks: the wall
    time and each rank's peak resident memory, sampled every 50 ms."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    script = os.path.join(os.path.dirname(__file__), "..", "convert_checkpoint.py")
    started = time.perf_counter()
    process = subprocess.Popen([torchrun, "--standalone", "--nproc-per-node", str(ranks), script] + arguments
                               + ["--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, parent = {}, psutil.Process(process.pid)
    while process.poll() is None:
        try:
            for child in parent.children(recursive=True):
                if "convert_checkpoint.py" in " ".join(child.cmdline()):
                    peak[child.pid] = max(peak.get(child.pid, 0), child.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if process.returncode:
        raise RuntimeError(process.stderr.read().decode()[-2000:])
    return time.perf_counter() - started, sorted(peak.values(), reverse=True)


def convert(hf_dir, out_dir, ranks):
    shutil.rmtree(out_dir, ignore_errors=True)
    seconds, peaks = timed_torchrun(["hf-to-megatron", "--load-dir", hf_dir, "--save-dir", out_dir], ranks)
    return seconds, peaks[0] if peaks else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/bench_convert_7b")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--smallest", action="store_true", help="the tiny preset's shapes, one rank (CI runs it)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.smallest:
        args.ranks = [1]
    model = write_checkpoint(os.path.join(args.workdir, "hf"), preset("tiny" if args.smallest else "llama2-7b"))
    print(f"{'tiny' if args.smallest else 'LLaMA-2-7B'} shape ({model.num_parameters() / 1e9:.2f}B parameters, bf16) ready in {time.perf_counter() - started:.0f} s; "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    for ranks in args.ranks:
        seconds, rss = convert(os.path.join(args.workdir, "hf"), os.path.join(args.workdir, f"megatron_{ranks}"), ranks)
        print(f"ranks {ranks}: {seconds:.0f} s wall, peak RSS of one rank {rss / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
