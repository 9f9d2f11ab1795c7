#!/usr/bin/env python
"""``symnoise-generate`` in a checkout, with the same options (symnoise_megatron/commands/generate.py)."""

import sys

from symnoise_megatron.commands.generate import main

if __name__ == "__main__":
    sys.exit(main())
