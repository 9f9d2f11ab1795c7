#!/usr/bin/env python
"""A fine-tuning step on Transformer Engine's layers, small: does the TE training path run and
train before anything is measured on it?

  python tools/bench/te_step.py --workdir /tmp/te_step [--num-layers 2 --seq-length 256]

A LLaMA-2-7B-wide model with --num-layers layers (random, BF16), symmetric noise (alpha 5,
concat pairing), one micro-batch of packed rows of --seq-length tokens from the bundled set
with an empty filler row among them (Transformer Engine's thd path with a sequence of length
0), through the trainer's own step (forward, backward, DDP, optimizer). Each of --steps steps
must give a finite loss and a non-zero gradient on the word embedding and on layer 0's QKV
weight (issue 24: the fused noise kernel once cut the embedding's gradient on CUDA). Times:
the first step (kernel compilation and allocations included) and the ones after it.

Writes te_step.json (tools/bench/results/ and $OUT) after every step; exits 1 when a check
fails, 0 with SKIPPED where there is no CUDA or no TE. ``--smallest``: the tiny model on the
CPU, local spec (the dry run).
"""

import argparse
import math
import os
import sys
import time

import torch  # noqa: F401  (before Transformer Engine: it loads the CUDA libraries TE links against)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from te_results import (  # noqa: E402
    add_smallest_flag, bundled_data, device_name, one_process_group, stage_device, synchronize, versions, write_json,
)

WATCHED = ("embedding.word_embeddings.weight", "decoder.layers.0.self_attention.linear_qkv.weight")


def packed_microbatches(data, seq_length: int, rows: int):
    """``rows`` packed rows of the bundled samples, the last of them empty (a filler row)."""
    from symnoise_megatron.data.microbatch import concatenate
    from symnoise_megatron.data.sft_dataset import Sample, empty_packed_row, pack

    samples, packed = [], []
    for uid in range(len(data)):
        samples.append(Sample(uid, *data[uid]))
        packed = pack(samples, seq_length)
        if len(packed) >= rows:
            break
    return [concatenate(packed[:rows - 1] + [empty_packed_row(seq_length)])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/te_step")
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4, help="packed rows in the micro-batch, the last one empty")
    parser.add_argument("--steps", type=int, default=3)
    add_smallest_flag(parser)
    args = parser.parse_args(argv)
    device = stage_device("te_step", args.smallest)
    if device is None:
        return 0
    if args.smallest:
        args.num_layers, args.seq_length, args.rows, args.steps = 2, 64, 3, 2
    with one_process_group():
        return run(args, device)


def run(args, device: str) -> int:
    from symnoise_megatron.data.sft_dataset import SFTIndexedData
    from symnoise_megatron.model.builder import built_with_transformer_engine
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    prefix = bundled_data(args.workdir, args.seq_length)
    config = TrainingConfig.from_flags(
        data_path=[prefix], model="tiny" if args.smallest else "llama2-7b", num_layers=args.num_layers,
        seq_length=args.seq_length, pack_sequences=True, micro_batch_size=args.rows, global_batch_size=args.rows,
        train_iters=args.steps, lr=1e-5, lr_warmup_fraction=0.0, bf16=True, noise_kind="symmetric", noise_alpha=5.0,
        noise_pairing="concat", eval_interval=None, log_interval=10 ** 6, split="100,0")
    trainer = Trainer(config, log=lambda message: None)
    microbatches = packed_microbatches(SFTIndexedData(prefix), args.seq_length, args.rows)

    class FixedRows(type(trainer.batches)):
        def __call__(self, *unused):
            return microbatches  # the same packed rows, filler included, every step, staged as a run stages its own

    trainer.batches.__class__ = FixedRows
    watched = {name: param for chunk in trainer.chunks for name, param in chunk.module.named_parameters()
               if name.removeprefix("module.") in WATCHED}
    spec = "te" if any(built_with_transformer_engine(chunk) for chunk in trainer.chunks) else "local"
    report = {"device": device_name(), "versions": versions(), "dry_run": args.smallest, "spec": spec,
              "command": "python tools/bench/te_step.py " + " ".join(sys.argv[1:]), "layers": args.num_layers,
              "seq_length": args.seq_length, "rows": args.rows, "steps": [], "passed": False}
    for step in range(args.steps):
        synchronize()
        started = time.perf_counter()
        loss, grad_norm, _, _ = trainer.train_step()
        synchronize()
        seconds = time.perf_counter() - started
        gradients = {name.removeprefix("module."): float(param.main_grad.float().norm()) for name, param in watched.items()}
        report["steps"].append({"seconds": seconds, "loss": loss, "grad_norm": float(grad_norm or 0.0),
                                "gradient_norms": gradients})
        print(f"step {step + 1}: {seconds:.3f} s, loss {loss:.4f}, gradient norms {gradients}", flush=True)
        checks = [math.isfinite(s["loss"]) and sorted(s["gradient_norms"]) == sorted(WATCHED)
                  and all(math.isfinite(g) and g > 0 for g in s["gradient_norms"].values()) for s in report["steps"]]
        report["passed"] = all(checks)
        report["first_step_s"] = report["steps"][0]["seconds"]
        report["later_step_s"] = min((s["seconds"] for s in report["steps"][1:]), default=None)
        write_json("te_step.json", report, dry_run=args.smallest)
    print(f"te_step ({spec} spec): {'passed' if report['passed'] else 'FAILED'}; first step {report['first_step_s']:.3f} s, "
          f"then {report['later_step_s'] or float('nan'):.3f} s")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
