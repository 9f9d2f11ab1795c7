"""Evaluation: generation from converted checkpoints."""
