"""The per-step inputs (noise batch, loss positions) last one forward: the forward step sets
both and clears both, so no later forward sees a stale micro-batch."""

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, SEQ, ROWS = 128, 16, 2


def state_around_a_forward_step():
    from symnoise_megatron.data.microbatch import MicroBatch
    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.runtime.parallel import initialize_distributed
    from symnoise_megatron.training.forward_step import forward_step

    initialize_distributed(ParallelConfig())
    model_config = ModelConfig(vocab_size=VOCAB, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = build_gpt_model(model_config, NoiseConfig("symmetric", 5.0),
                            make_transformer_config(model_config, ParallelConfig()))
    tokens = torch.randint(0, VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ).expand(ROWS, SEQ).clone()
    loss_mask = (positions >= 4).float()
    microbatch = MicroBatch(tokens, torch.roll(tokens, -1, 1), loss_mask, positions, torch.arange(ROWS),
                            torch.full((ROWS,), SEQ))
    embedding = noisy_embeddings(model)[0]
    outputs = []
    embedding.register_forward_hook(lambda module, inputs, output: outputs.append(output.detach().clone()))

    model.train()
    output, loss_func = forward_step(iter([microbatch]), model)
    loss_func(output)  # as megatron-core's schedule: after the forward step has returned
    from symnoise_megatron.noise.embedding_noise import embedding_noise

    after = {"noise_batch": embedding.noise_batch, "loss_positions": model.loss_positions,
             "added": outputs[0] - torch.nn.functional.embedding(tokens, embedding.weight).detach(),
             "expected": embedding_noise(NoiseConfig("symmetric", 5.0), microbatch.sample_uids, positions,
                                         microbatch.lengths, embedding.embedding_dim)}
    try:
        model(tokens, positions, microbatch.attention_mask(), labels=microbatch.labels)
        after["second_forward"] = "ran"
    except RuntimeError as error:
        after["second_forward"] = str(error)
    return after


def test_a_forward_step_leaves_no_noise_batch_and_no_loss_positions_behind():
    after = run_distributed(state_around_a_forward_step, 1)[0]
    # What the forward step handed over is what the embedding added: this micro-batch's noise, sign +1.
    assert after["expected"].abs().min() > 0
    torch.testing.assert_close(after["added"], after["expected"], rtol=0, atol=1e-6)
    assert after["noise_batch"] is None and after["loss_positions"] is None
    # Without a batch of its own, a training forward is refused rather than noised with the last one.
    assert "got no NoiseBatch" in after["second_forward"]
