"""Checkpoints: Hugging Face conversion, megatron-core distributed checkpoints."""
