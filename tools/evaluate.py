#!/usr/bin/env python
"""``symnoise-evaluate`` in a checkout, with the same options (symnoise_megatron/commands/evaluate.py)."""

import sys

from symnoise_megatron.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
