#!/usr/bin/env python
"""``symnoise-split`` in a checkout, with the same options (symnoise_megatron/commands/split.py)."""

import sys

from symnoise_megatron.commands.split import main

if __name__ == "__main__":
    sys.exit(main())
