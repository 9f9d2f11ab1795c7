"""Rank layouts for a fine-tune: TP/PP/CP/DP, virtual pipeline stages, the pipeline split,
activation recomputation and the data-parallel overlap, by estimated memory per GPU and step time.

  symnoise-plan --model llama2-70b --gpus 64 --fp8 --seq-length 512 --global-batch-size 128
  symnoise-plan --load ckpt/llama2-70b --gpus 128 --pairing microbatch --top 5
  symnoise-plan --model llama3-70b --gpus 32 --fp8 --seq-length 4096 --global-batch-size 32 --pairing none

Every layout that divides the GPUs, heads, key/value groups, layers and global batch is
estimated, each with its virtual-stage counts and pipeline splits (even; the embedding or loss
counted as a layer; the end stages a layer or two lighter) and the fastest recomputation that
fits (none, the MLP's, or full recomputation of the fewest layers per model chunk): weights,
gradients, optimizer shards, activations in flight on each pipeline rank with the symmetric pair
(``concat`` doubles the micro-batch rows, ``microbatch`` runs two micro-batches), logits, fixed
overhead; step time from each rank's FLOPs at --mfu, the pipeline bubble, sequence parallelism's
collectives and the data-parallel and pipeline exchanges, overlapped where the flags overlap
them (formulas in symnoise_megatron/runtime/layout_planner.py). Layouts that fit come first,
fastest first, then the one with fewer model-parallel ranks. Megatron-Bridge's published SFT
layouts are estimated beside them, with where and why the pick differs. These are estimates to
choose a starting point, not measurements: check the first iterations' memory and time in the log.
"""

import argparse

import yaml

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.model.config import PRESETS, preset
from symnoise_megatron.runtime.hardware import GPU_MEMORY_GB
from symnoise_megatron.runtime.layout_planner import (
    RECOMPUTE_CHOICES, USABLE_FRACTION, PlanInputs, compare_with_reference, ranked_plans, reference_plans,
)


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--recompute", choices=RECOMPUTE_CHOICES, default="auto",
                        help="auto (default): the fastest of none, mlp and full recomputation of the fewest layers "
                             "that fit; or fix one: none, selective (core_attn), mlp, full (every layer)")
    parser.add_argument("--pairing", choices=["concat", "microbatch", "none"], default="concat",
                        help="symmetric pairing, or none for a single copy (no noise, or NEFTune)")
    parser.add_argument("--mfu", type=float, default=0.40, help="model-FLOPs utilisation assumed (default 0.40)")
    parser.add_argument("--network-gbps", type=float, default=50.0, help="per-GPU bandwidth across nodes, GB/s (default 50)")
    parser.add_argument("--no-virtual-stages", action="store_true", help="plan without interleaved pipeline stages")
    parser.add_argument("--even-split", action="store_true", help="plan equal layers per pipeline stage only")
    parser.add_argument("--no-overlap", action="store_true",
                        help="plan without --overlap-grad-reduce/--overlap-param-gather")
    parser.add_argument("--grad-reduce-in-bf16", action="store_true",
                        help="BF16 gradient buffers and reductions (the fine-tune's "
                             "accumulate_allreduce_grads_in_fp32: false); default FP32")
    parser.add_argument("--top", type=int, default=10, help="show this many layouts (default 10)")
    return parser


def plan_inputs(args) -> PlanInputs:
    if args.load:
        from symnoise_megatron.checkpoint.convert import model_config_of

        model = model_config_of(args.load)
    else:
        model = preset(args.model)
    return PlanInputs(model, args.seq_length, args.global_batch_size, args.micro_batch_size, args.gpus, args.gpu,
                      args.fp8, args.recompute, args.pairing, args.mfu, args.network_gbps,
                      virtual_stages=not args.no_virtual_stages, uneven_splits=not args.even_split,
                      overlap=not args.no_overlap, grad_reduce_in_fp32=not args.grad_reduce_in_bf16)


@exits_on_user_error
def main(argv=None):
    args = build_parser().parse_args(argv)
    inputs = plan_inputs(args)
    model = inputs.model
    plans = ranked_plans(inputs)
    print(f"{args.model or args.load}: {model.num_parameters() / 1e9:.1f}B parameters, {args.gpus} x {args.gpu} "
          f"({GPU_MEMORY_GB[args.gpu]:.0f} GB), {'FP8' if args.fp8 else 'BF16'}, seq {args.seq_length}, global batch "
          f"{args.global_batch_size}, micro-batch {args.micro_batch_size}, {args.recompute} recompute, "
          f"pairing {args.pairing}, MFU {args.mfu:.0%}\n")
    print("| rank | layout | split | recompute | params/GPU | weights | grads | optimizer | activations | total GB "
          "| fits | step s (est.) | bubble s | DP s | PP s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for rank, p in enumerate(plans[: args.top], start=1):
        print(f"| {rank} | {p.name} | {p.split} | {p.recompute.name} | {p.parameters_per_gpu / 1e9:.2f}B | "
              f"{p.weights_gb:.1f} | {p.gradients_gb:.1f} | {p.optimizer_gb:.1f} | {p.activations_gb:.1f} | "
              f"{p.total_gb:.1f} | {'yes' if p.fits else 'no'} | {p.step_seconds:.2f} | {p.time['bubble']:.2f} | "
              f"{p.time['data parallel']:.2f} | {p.time['pipeline']:.2f} |")
    best = plans[0]
    if not best.fits:
        print("\nno layout fits: use --pairing microbatch, more GPUs or FP8")
    else:
        settings = dict(best.run_config(), use_distributed_optimizer=inputs.distributed_optimizer)
        print("\nrecommended (a layout file's keys; the memory columns are its busiest pipeline rank's):\n")
        print(yaml.safe_dump(settings, sort_keys=False).rstrip())
    usable = USABLE_FRACTION * GPU_MEMORY_GB[args.gpu]
    for reference, planned, published in reference_plans(inputs):
        print("\n" + compare_with_reference(best, reference, planned, published, usable))
    return 0
