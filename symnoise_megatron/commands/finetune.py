"""symnoise-finetune: the fine-tuning job. Run it under torchrun:

  torchrun --nproc-per-node 8 $(which symnoise-finetune) --config run.yaml
  torchrun --nproc-per-node 8 -m symnoise_megatron.finetune --config run.yaml    # the same, by module name
"""

import os

import torch.distributed as dist

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.runtime.cpu import runtime_for_this_machine
from symnoise_megatron.runtime.parallel import destroy_distributed
from symnoise_megatron.training.arguments import parse_config


@exits_on_user_error
def main(argv=None) -> int:
    config = parse_config(argv)
    config.validate()
    from symnoise_megatron.training.loop import Trainer

    def run():
        try:
            Trainer(config, log=rank0_print).run()
        finally:
            destroy_distributed()

    with runtime_for_this_machine():
        run()
    return 0


def rank0_print(message: str) -> None:
    """Print on the job's first rank only: torchrun's RANK before the process group exists (the
    data's split and the checks before it are logged then), the group's rank after."""
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(message, flush=True)
