"""Embedding noise: NEFTune's uniform noise, its gaussian and bernoulli variants, SymNoise."""

from symnoise_megatron.noise.config import NOISE_KINDS, PAIRINGS, NoiseConfig
from symnoise_megatron.noise.embedding_noise import embedding_noise, noise_scale

__all__ = ["NOISE_KINDS", "PAIRINGS", "NoiseConfig", "embedding_noise", "noise_scale"]
