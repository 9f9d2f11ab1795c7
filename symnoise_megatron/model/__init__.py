"""Model shapes and the GPTModel builder."""

from symnoise_megatron.model.config import PRESETS, ModelConfig, padded_vocab_size, preset

__all__ = ["PRESETS", "ModelConfig", "padded_vocab_size", "preset"]
