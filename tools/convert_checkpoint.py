#!/usr/bin/env python
"""``symnoise-convert`` in a checkout, with the same options (symnoise_megatron/commands/convert.py)."""

import sys

from symnoise_megatron.commands.convert import main

if __name__ == "__main__":
    sys.exit(main())
