"""Check a megatron checkpoint against its Hugging Face original with transformers.

  torchrun --nproc-per-node 4 $(which symnoise-verify) --hf-dir HF --megatron-dir MG \\
      --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Loads the checkpoint into the project's GPTModel under the given layout (each rank's GPU, or
CPU and gloo without one), runs it and transformers' model on the same random token batch on
that device in FP32, prints the largest absolute and relative logit differences and both
losses, and exits 1 when the largest difference over the largest |logit| exceeds --tolerance.
"""

import argparse
import json

import torch.distributed as dist

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.common.extras import require
from symnoise_megatron.runtime.cpu import runtime_for_this_machine
from symnoise_megatron.model.parallelism import ParallelConfig
from symnoise_megatron.runtime.parallel import destroy_distributed, initialize_distributed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--megatron-dir", required=True)
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest |logit difference| over the largest |logit| allowed (default: 2e-5 in FP32; "
                             "1e-2 where Transformer Engine's layers run FP32 GEMMs as TF32)")
    return parser.parse_args(argv)


def run(args):
    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import model_config_of
    from symnoise_megatron.checkpoint.verify import check_same_model, compare_with_transformers

    require("transformers", "symnoise-verify runs the Hugging Face model beside the checkpoint")
    # A folder that is no checkpoint (or holds only an unfinished save), or two different
    # models, fail here, before any rank waits on another.
    paths.read_info(args.megatron_dir)
    paths.read_tracker(args.megatron_dir)
    check_same_model(args.hf_dir, args.megatron_dir, model_config_of(args.megatron_dir))
    parallel = ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    initialize_distributed(parallel)
    report = compare_with_transformers(args.hf_dir, args.megatron_dir, parallel,
                                       batch=args.batch_size, seq=args.seq_length, seed=args.seed)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    report = next(r for r in reports if r is not None)
    tolerance = report.default_tolerance() if args.tolerance is None else args.tolerance
    if dist.get_rank() == 0:
        print(json.dumps({**vars(report), "scaled_diff": report.scaled_diff, "tolerance": tolerance,
                          "passed": report.passed(tolerance)}))
    destroy_distributed()
    return 0 if report.passed(tolerance) else 1


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    with runtime_for_this_machine():
        return run(args)
