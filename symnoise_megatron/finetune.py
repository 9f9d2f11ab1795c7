"""``python -m symnoise_megatron.finetune``: the fine-tuning job under its module name (torchrun -m),
the same as the symnoise-finetune command (symnoise_megatron/commands/finetune.py)."""

import sys

from symnoise_megatron.commands.finetune import main

if __name__ == "__main__":
    sys.exit(main())
