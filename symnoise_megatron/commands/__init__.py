"""The command-line entry points: one module per console script (named in setup.py).

Each parses its flags and calls library functions from the folders below; a user error is
one line on stderr and exit code 2 (errors.py). In a checkout, tools/*.py are aliases of
these commands, and ``python -m symnoise_megatron.finetune`` is symnoise-finetune.
"""
