#!/usr/bin/env python
"""``symnoise-compare`` in a checkout, with the same options (symnoise_megatron/commands/compare.py)."""

import sys

from symnoise_megatron.commands.compare import main

if __name__ == "__main__":
    sys.exit(main())
