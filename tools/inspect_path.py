#!/usr/bin/env python
"""``symnoise-inspect`` in a checkout, with the same options (symnoise_megatron/commands/inspect_path.py).

Not tools/inspect.py: a script's folder comes first on sys.path, and a tools/inspect.py would
then be imported in place of the standard library's ``inspect`` (which torch imports)."""

import sys

from symnoise_megatron.commands.inspect_path import main

if __name__ == "__main__":
    sys.exit(main())
