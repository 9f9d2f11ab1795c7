"""Logits at loss tokens only: the same losses and gradients as megatron-core's full output layer.

TP 2 x PP 2 on 4 gloo ranks, untied (LLaMA) and tied (OPT) output weights, through megatron-core's
pipeline schedule; one micro-batch carries no loss token at all.
"""

from functools import partial

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, SEQ, MICRO_BATCH = 200, 16, 2

ARCHITECTURES = {
    "llama": dict(architecture="llama", num_query_groups=2),
    "opt": dict(architecture="opt", tie_word_embeddings=True),
}


def microbatches():
    """Prompts of 4-6 tokens, responses to each sample's length; the last micro-batch is all prompt."""
    from symnoise_megatron.data.microbatch import MicroBatch

    generator = torch.Generator().manual_seed(3)
    out = []
    for index, (prompt, lengths) in enumerate([((4, 6), (SEQ, SEQ - 5)), ((5, 4), (SEQ - 2, SEQ)), ((SEQ, SEQ), (SEQ, 9))]):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
        positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ).clone()
        lengths = torch.tensor(lengths)
        loss_mask = ((positions >= torch.tensor(prompt)[:, None]) & (positions < lengths[:, None])).float()
        uids = torch.arange(index * MICRO_BATCH, (index + 1) * MICRO_BATCH)
        out.append(MicroBatch(tokens, torch.roll(tokens, -1, 1), loss_mask, positions, uids, lengths))
    return out


def full_output_layer_step(data_iterator, model):
    """The forward step with megatron-core's own output layer over every position."""
    from symnoise_megatron.model.step_inputs import step_inputs
    from symnoise_megatron.training.forward_step import token_loss

    microbatch = next(data_iterator)
    with step_inputs(model, microbatch.noise_batch()):
        output = model(microbatch.tokens, microbatch.position_ids, microbatch.attention_mask(), labels=microbatch.labels)
    return output, partial(token_loss, microbatch.loss_mask)


def recording(step, outputs):
    def recorded(data_iterator, model):
        output, loss_func = step(data_iterator, model)
        outputs.append(output.detach().clone())
        return output, loss_func
    return recorded


def train_both_ways():
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed
    from symnoise_megatron.training.forward_step import forward_step

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    initialize_distributed(parallel)
    results = {}
    for arch, fields in ARCHITECTURES.items():
        model_config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                                   vocab_size=VOCAB, max_position_embeddings=SEQ, **fields)
        config = make_transformer_config(model_config, parallel)
        for name, step in (("loss tokens only", forward_step), ("full", full_output_layer_step)):
            torch.manual_seed(0)
            model = build_gpt_model(model_config, NoiseConfig("uniform", alpha=5.0), config)
            outputs = []
            losses = get_forward_backward_func()(
                forward_step_func=recording(step, outputs), data_iterator=iter(microbatches()), model=[model],
                num_microbatches=len(microbatches()), seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=False)
            results[(arch, name)] = {
                "losses": [entry["lm loss"] for entry in losses],
                "per_token": outputs if model.post_process else None,
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            }
        if parallel_state.is_pipeline_last_stage():
            with torch.no_grad():
                mb = microbatches()[0]
                model.eval()
                results[(arch, "logits")] = model(mb.tokens, mb.position_ids, mb.attention_mask()).shape
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(train_both_ways, 4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_per_token_losses_equal_the_full_output_layers_at_loss_tokens_and_are_zero_elsewhere(ranks, arch):
    last = ranks[-1]
    selected, full = last[(arch, "loss tokens only")]["per_token"], last[(arch, "full")]["per_token"]
    for microbatch, ours, reference in zip(microbatches(), selected, full):
        mask = microbatch.loss_mask.bool()
        assert ours.shape == reference.shape == (MICRO_BATCH, SEQ)
        torch.testing.assert_close(ours[mask], reference[mask], rtol=1e-5, atol=1e-5)
        # An all-prompt micro-batch still runs its first position (masked out by the loss function).
        assert torch.count_nonzero(ours[~mask]) == (0 if mask.any() else 1)
    assert not microbatches()[-1].loss_mask.any()  # the all-prompt micro-batch ran too
    for ours, reference in zip(last[(arch, "loss tokens only")]["losses"], last[(arch, "full")]["losses"]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_equal_the_full_output_layers_on_every_rank(ranks, arch):
    for rank, results in enumerate(ranks):
        ours, reference = results[(arch, "loss tokens only")]["grads"], results[(arch, "full")]["grads"]
        assert ours and set(ours) == set(reference), rank
        for name in ours:
            torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_outside_training_cover_every_position(ranks, arch):
    from symnoise_megatron.model.config import padded_vocab_size

    assert tuple(ranks[-1][(arch, "logits")]) == (MICRO_BATCH, SEQ, padded_vocab_size(VOCAB, 128, 2) // 2)
