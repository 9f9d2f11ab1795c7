"""symnoise-finetune: the fine-tuning job. Run it under torchrun:

  torchrun --nproc-per-node 8 $(which symnoise-finetune) --config run.yaml
  torchrun --nproc-per-node 8 -m symnoise_megatron.finetune --config run.yaml    # the same, by module name
"""

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

    def rank0_print(message):
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(message, flush=True)

    def run():
        try:
            Trainer(config, log=rank0_print).run()
        finally:
            destroy_distributed()

    with runtime_for_this_machine():
        run()
    return 0
