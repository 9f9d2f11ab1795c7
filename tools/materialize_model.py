#!/usr/bin/env python
"""``symnoise-materialize`` in a checkout, with the same options (symnoise_megatron/commands/materialize.py)."""

import sys

from symnoise_megatron.commands.materialize import main

if __name__ == "__main__":
    sys.exit(main())
