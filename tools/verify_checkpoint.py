#!/usr/bin/env python
"""``symnoise-verify`` in a checkout, with the same options (symnoise_megatron/commands/verify.py)."""

import sys

from symnoise_megatron.commands.verify import main

if __name__ == "__main__":
    sys.exit(main())
