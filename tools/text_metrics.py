#!/usr/bin/env python
"""``symnoise-metrics`` in a checkout, with the same options (symnoise_megatron/commands/metrics.py)."""

import sys

from symnoise_megatron.commands.metrics import main

if __name__ == "__main__":
    sys.exit(main())
