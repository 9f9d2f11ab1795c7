#!/usr/bin/env python
"""The fused noise kernel on a GPU: achieved bandwidth against the device's own copy
bandwidth, and time against the unfused torch reference, in one run.

  python tools/bench/bench_noise_kernel.py                       # LLaMA-2-7B and 70B widths, BF16
  python tools/bench/bench_noise_kernel.py --tokens 16384 --hidden 8192 --dtype float32

For each shape: the kernel reads x and writes x + noise (2 x b x s x h x bytes moved; the
per-token key and scale are negligible); ``copy`` is ``out.copy_(x)`` on the same tensors,
the best a one-pass elementwise kernel can do. Goal (issue 7): kernel bandwidth >= 85% of copy.
Needs CUDA and Triton; prints why not otherwise. ``--smallest``: one small float32 shape under
Triton's interpreter on the CPU, host timers (the dry run: the script's code runs, the figures
mean nothing).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import add_smallest_flag  # noqa: E402

from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.noise.embedding_noise import embedding_noise
from symnoise_megatron.noise.fused import add_noise_fused, triton_available


def host_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` on the host (the interpreter's dry run)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cuda_time(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after warm-up, host launch cost included."""
    if not torch.cuda.is_available():
        return host_time(fn, repeats)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_time(fn, repeats: int, calls: int = 20) -> float:
    """Median device seconds of one ``fn`` call: ``calls`` calls captured in a CUDA graph and
    replayed, so the host's launch cost (paid once per micro-batch in training, hidden behind
    the GPU's queue) stays out of the bandwidth."""
    if not torch.cuda.is_available():
        return host_time(fn, repeats)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except RuntimeError as error:  # something in fn cannot be captured: time it eagerly
        print(f"(not capturable, timed eagerly: {str(error).splitlines()[0]})")
        torch.cuda.synchronize()
        return cuda_time(fn, repeats)
    return cuda_time(graph.replay, repeats) / calls


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="b x s per micro-batch")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--kinds", nargs="+", default=["symmetric", "uniform", "gaussian"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--tiles", nargs="+", default=["4x1024"],
                        help="TOKENSxBLOCK tiles per program to compare (add_noise_fused's tokens_per_program, block)")
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    device = "cuda"
    if args.smallest and triton_available():
        # Before the kernel is first imported: triton.jit reads it when it decorates.
        os.environ["TRITON_INTERPRET"] = "1"
        args.tokens, args.hidden, args.dtype, args.kinds, args.repeats = [256], [64], "float32", ["symmetric"], 2
        args.tiles, device = ["128x64"], "cpu"
    elif not torch.cuda.is_available() or not triton_available():
        print("needs a CUDA device and Triton (the kernel's bits are checked on CPU by tests/noise/test_fused_kernel.py)")
        return 1
    dtype = getattr(torch, args.dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton's interpreter (dry run)"
    print(f"{name}, torch {torch.__version__}, {args.dtype}\n")
    print("Device time from CUDA-graph replays; 'per call' adds the host's launch cost (eager).\n")
    print("| kind | tokens | hidden | tile | copy GB/s | kernel GB/s | kernel / copy | reference ms | kernel ms | speed-up | per call ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for hidden in args.hidden:
            rows, seq = max(1, tokens // 4096), min(tokens, 4096)
            x = torch.randn(rows, seq, hidden, device=device, dtype=dtype)
            out = torch.empty_like(x)
            positions = torch.arange(seq, device=device).expand(rows, seq)
            lengths = torch.full((rows,), seq, device=device)
            uids = torch.arange(rows, device=device)
            sign = torch.ones(rows, dtype=torch.int64, device=device)
            moved = 2 * x.numel() * x.element_size()
            copy = graph_time(lambda: out.copy_(x), args.repeats)
            for kind in args.kinds:
                config = NoiseConfig(kind, 5.0, seed=1)
                reference = graph_time(lambda: x + embedding_noise(config, uids, positions, lengths, hidden, sign=sign,
                                                                  dtype=dtype), args.repeats)
                for tile in args.tiles:
                    per_program, block = (int(v) for v in tile.split("x"))
                    def kernel():
                        return add_noise_fused(x, config, uids, positions, lengths, sign, block=block,
                                               tokens_per_program=per_program)

                    fused, eager = graph_time(kernel, args.repeats), cuda_time(kernel, args.repeats)
                    print(f"| {kind} | {rows * seq} | {hidden} | {tile} | {moved / copy / 1e9:.0f} | {moved / fused / 1e9:.0f} | "
                          f"{copy / fused:.1%} | {reference * 1e3:.3f} | {fused * 1e3:.3f} | {reference / fused:.1f}x | "
                          f"{eager * 1e3:.3f} |",
                          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
