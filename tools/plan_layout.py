#!/usr/bin/env python
"""``symnoise-plan`` in a checkout, with the same options (symnoise_megatron/commands/plan.py)."""

import sys

from symnoise_megatron.commands.plan import main

if __name__ == "__main__":
    sys.exit(main())
