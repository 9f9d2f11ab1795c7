"""``python -m symnoise_megatron.finetune``: the fine-tuning job (run it under torchrun)."""

import sys

import torch.distributed as dist

from symnoise_megatron.runtime.cpu import runtime_for_this_machine
from symnoise_megatron.runtime.parallel import destroy_distributed
from symnoise_megatron.training.arguments import parse_config


def main(argv=None) -> int:
    try:
        config = parse_config(argv)
        config.validate()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from symnoise_megatron.training.loop import Trainer

    def rank0_print(message):
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(message, flush=True)

    def run():
        try:
            Trainer(config, log=rank0_print).run()
        finally:
            destroy_distributed()

    try:
        with runtime_for_this_machine():
            run()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
