"""A fine-tune forced onto the fused kernel (Triton's interpreter on CPU) trains the losses of the
torch reference path, with full and selective activation recomputation, at PP 1 and PP 2.

Issue 24: the kernel's output had no grad_fn, so on CUDA the embedding never trained and, under
full recomputation, the checkpointed layers saw no input needing a gradient. Forward bits
alone (test_fused_kernel.py) could not see it; the losses of a few steps do."""

import os

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

STEPS = 3


def losses_of_both_paths(prefix, pipeline_stages):
    """(recompute granularity, fused) -> the losses of STEPS steps from the same start."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is first imported (triton.jit reads it)
    from unittest import mock

    from megatron.core import parallel_state

    from symnoise_megatron.noise import embedding as noisy_embedding
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = {}
    for granularity in ("full", "selective"):
        for fused in (True, False):
            config = TrainingConfig.from_flags(
                data_path=[prefix], seq_length=64, micro_batch_size=2, global_batch_size=4, train_iters=STEPS, lr=2e-3,
                lr_warmup_fraction=0.0, noise_kind="symmetric", noise_pairing="concat", recompute_granularity=granularity,
                pipeline_model_parallel_size=pipeline_stages, log_interval=10 ** 6, split="100,0")
            trainer = Trainer(config, log=lambda message: None)
            embeddings = noisy_embeddings(trainer.chunks)
            for embedding in embeddings:
                embedding.use_fused_noise = fused
            kernel = mock.Mock(wraps=noisy_embedding.add_noise_fused)
            with mock.patch.object(noisy_embedding, "add_noise_fused", kernel):
                losses = [trainer.train_step()[0] for _ in range(STEPS)]
            # The path asked for is the path taken, on the stage that holds the embedding.
            assert kernel.called == (fused and bool(embeddings))
            out[granularity, fused] = losses
            parallel_state.destroy_model_parallel()
    return out


@pytest.mark.parametrize("pipeline_stages", [1, 2], ids=["pp1", "pp2"])
def test_the_fused_path_trains_the_reference_losses_under_recomputation(short_rows_prefix, pipeline_stages):
    losses = run_distributed(losses_of_both_paths, pipeline_stages, short_rows_prefix, pipeline_stages)[0]
    for granularity in ("full", "selective"):
        fused, reference = losses[granularity, True], losses[granularity, False]
        assert reference[-1] < reference[0], granularity
        assert fused == pytest.approx(reference, rel=1e-6, abs=1e-6), granularity
