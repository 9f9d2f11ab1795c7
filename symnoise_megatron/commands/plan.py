"""Rank TP/PP/CP/DP layouts for a fine-tune: estimated memory per GPU and step time.

  symnoise-plan --model llama2-70b --gpus 64 --fp8 --seq-length 512 --global-batch-size 128
  symnoise-plan --load ckpt/llama2-70b --gpus 128 --pairing microbatch --top 5

Every layout that divides the GPUs, heads, key/value groups, layers and global batch is
estimated (formulas in symnoise_megatron/runtime/layout_planner.py): weights, gradients,
optimizer shards, activations with the symmetric pair (``concat`` doubles the micro-batch
rows, ``microbatch`` runs two micro-batches), logits, fixed overhead; step time from model
FLOPs at --mfu, with the 1F1B bubble and the data-parallel gradient exchange. Layouts that fit come first, fastest first, then the
one with fewer model-parallel ranks. These are estimates to choose a starting point, not
measurements: check the first iterations' memory and time in the log.
"""

import argparse

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.model.config import PRESETS, preset
from symnoise_megatron.runtime.hardware import GPU_MEMORY_GB
from symnoise_megatron.runtime.layout_planner import PlanInputs, ranked_plans


@exits_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=sorted(PRESETS), help="a model preset")
    source.add_argument("--load", help="a megatron checkpoint directory: its model")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (8 per node)")
    parser.add_argument("--gpu", choices=list(GPU_MEMORY_GB), default="H100", help="the GPU model (default H100)")
    parser.add_argument("--seq-length", type=int, default=512, help="default 512")
    parser.add_argument("--global-batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--micro-batch-size", type=int, default=1, help="default 1")
    parser.add_argument("--fp8", action="store_true", help="FP8 GEMMs (default: BF16)")
    parser.add_argument("--recompute", choices=["selective", "full"], default="selective", help="default selective")
    parser.add_argument("--pairing", choices=["concat", "microbatch", "none"], default="concat",
                        help="symmetric pairing, or none for a single copy (no noise, or NEFTune)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model-FLOPs utilisation assumed (default 0.40)")
    parser.add_argument("--network-gbps", type=float, default=50.0, help="per-GPU bandwidth across nodes, GB/s (default 50)")
    parser.add_argument("--top", type=int, default=10, help="show this many layouts (default 10)")
    args = parser.parse_args(argv)
    if args.load:
        from symnoise_megatron.checkpoint.convert import model_config_of

        model = model_config_of(args.load)
    else:
        model = preset(args.model)
    inputs = PlanInputs(model, args.seq_length, args.global_batch_size, args.micro_batch_size, args.gpus, args.gpu,
                        args.fp8, args.recompute, args.pairing, args.mfu, args.network_gbps)
    plans = ranked_plans(inputs)
    print(f"{args.model or args.load}: {model.num_parameters() / 1e9:.1f}B parameters, {args.gpus} x {args.gpu} "
          f"({GPU_MEMORY_GB[args.gpu]:.0f} GB), {'FP8' if args.fp8 else 'BF16'}, seq {args.seq_length}, global batch "
          f"{args.global_batch_size}, micro-batch {args.micro_batch_size}, {args.recompute} recompute, "
          f"pairing {args.pairing}, MFU {args.mfu:.0%}\n")
    print("| rank | layout | params/GPU | weights | grads | optimizer | activations | total GB | fits | step s (est.) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rank, p in enumerate(plans[: args.top], start=1):
        print(f"| {rank} | {p.name} | {p.parameters_per_gpu / 1e9:.2f}B | {p.weights_gb:.1f} | {p.gradients_gb:.1f} | "
              f"{p.optimizer_gb:.1f} | {p.activations_gb:.1f} | {p.total_gb:.1f} | {'yes' if p.fits else 'no'} | "
              f"{p.step_seconds:.2f} |")
    best = plans[0]
    if not best.fits:
        print("\nno layout fits: use --recompute full, --pairing microbatch, more GPUs or FP8")
    else:
        print(f"\nrecommended: --tensor-model-parallel-size {best.tp} --pipeline-model-parallel-size {best.pp} "
              f"--context-parallel-size {best.cp}" + (" --sequence-parallel" if best.tp > 1 else "")
              + " --use-distributed-optimizer")
    return 0
