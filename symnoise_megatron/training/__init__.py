"""The training step: micro-batches, the symmetric pairing, the forward step."""
