"""symnoise-megatron: instruction fine-tuning with noisy embeddings (SymNoise) on megatron-core."""

__version__ = "0.1.0"

from symnoise_megatron.common import third_party_warnings as _third_party_warnings

# Before anything imports megatron-core: the warnings it prints that tell a user nothing.
_third_party_warnings.install()
