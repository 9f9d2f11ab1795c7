"""symnoise-megatron: instruction fine-tuning with noisy embeddings (SymNoise) on megatron-core."""

__version__ = "0.1.0"

import warnings as _warnings

# megatron-core announces at import that it falls back to torch kernels where Transformer
# Engine and Apex are absent: always so on CPU, where it is expected and not actionable.
_warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
