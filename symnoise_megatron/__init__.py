"""symnoise-megatron: instruction fine-tuning with noisy embeddings (SymNoise) on megatron-core."""

__version__ = "0.1.0"
