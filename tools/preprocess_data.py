#!/usr/bin/env python
"""``symnoise-preprocess`` in a checkout, with the same options (symnoise_megatron/commands/preprocess.py)."""

import sys

from symnoise_megatron.commands.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
