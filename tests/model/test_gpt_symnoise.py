"""A TP=2 x PP=2 GPTModel on 4 gloo ranks through megatron-core's pipeline schedule."""

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

VOCAB, SEQ, MICRO_BATCH, MICRO_BATCHES = 200, 16, 2, 2

ARCHITECTURES = {
    "llama": dict(architecture="llama", num_query_groups=2),
    "opt": dict(architecture="opt", tie_word_embeddings=True),
}
# name: (noise kind, pairing, build the plain megatron-core embedding instead, eval mode)
RUNS = {
    "symmetric_concat": ("symmetric", "concat", False, False),
    "symmetric_microbatch": ("symmetric", "microbatch", False, False),
    "uniform": ("uniform", "concat", False, False),
    "none": ("none", "concat", False, False),
    "plain": ("none", "concat", True, False),
    "symmetric_eval": ("symmetric", "concat", False, True),
    "plain_eval": ("none", "concat", True, True),
}


def microbatches():
    from symnoise_megatron.data.microbatch import MicroBatch

    generator = torch.Generator().manual_seed(1)
    out = []
    for index in range(MICRO_BATCHES):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator)
        positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ).clone()
        lengths = torch.tensor([SEQ, SEQ - 5])
        loss_mask = (positions < lengths[:, None]).float()
        uids = torch.arange(index * MICRO_BATCH, (index + 1) * MICRO_BATCH)
        out.append(
            MicroBatch(tokens, torch.roll(tokens, -1, 1), loss_mask, positions, uids, lengths)
        )
    return out


def train_tp2_pp2():
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from symnoise_megatron.data.microbatch import paired_microbatches
    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.runtime.parallel import initialize_distributed
    from symnoise_megatron.training.forward_step import forward_step

    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    initialize_distributed(parallel)
    results = {}
    for arch, fields in ARCHITECTURES.items():
        model_config = ModelConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
            vocab_size=VOCAB, max_position_embeddings=SEQ, **fields,
        )
        config = make_transformer_config(model_config, parallel)
        for name, (kind, pairing, plain, evaluate) in RUNS.items():
            noise = NoiseConfig(kind, alpha=5.0, pairing=pairing)
            torch.manual_seed(0)
            model = build_gpt_model(model_config, noise, config)
            if plain:  # megatron-core's own embedding, for the kind=none comparison
                from megatron.core.tensor_parallel import VocabParallelEmbedding

                if model.pre_process:
                    noisy = model.embedding.word_embeddings
                    model.embedding.word_embeddings = VocabParallelEmbedding(
                        noisy.num_embeddings, noisy.embedding_dim, init_method=lambda w: None,
                        config=config, reduce_scatter_embeddings=noisy.reduce_scatter_embeddings,
                    )
                    model.embedding.word_embeddings.weight = noisy.weight
            embedded = []  # the word embeddings' output of each forward (first stage only)
            for embedding in noisy_embeddings(model):
                embedding.register_forward_hook(
                    lambda module, args, output, store=embedded: store.append(output.detach().clone()))
            model.train(not evaluate)
            # Evaluation never pairs: it sees each sample once, without noise.
            step_noise = NoiseConfig("none") if evaluate else noise
            losses = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=paired_microbatches(microbatches(), step_noise),
                model=[model],
                num_microbatches=step_noise.microbatches_per_step(MICRO_BATCHES),
                seq_length=SEQ,
                micro_batch_size=step_noise.rows_per_microbatch(MICRO_BATCH),
                forward_only=evaluate,
            )
            report = torch.stack([entry["lm loss"] for entry in losses]).sum(0) if losses else None
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            shared = [getattr(e.weight, "shared_embedding", False) for e in noisy_embeddings(model)]
            results[(arch, name)] = {"loss": report, "grads": grads, "shared": shared, "embedded": embedded}
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(train_tp2_pp2, 4)


def last_stage_loss(ranks, arch, name):
    return ranks[-1][(arch, name)]["loss"]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_concat_and_microbatch_pairing_give_the_same_gradients(ranks, arch):
    for rank, results in enumerate(ranks):
        concat = results[(arch, "symmetric_concat")]["grads"]
        split = results[(arch, "symmetric_microbatch")]["grads"]
        assert concat and set(concat) == set(split), rank
        for name in concat:
            torch.testing.assert_close(split[name], concat[name], rtol=1e-5, atol=1e-6, msg=f"rank {rank} {name}")
    concat_loss = last_stage_loss(ranks, arch, "symmetric_concat")
    split_loss = last_stage_loss(ranks, arch, "symmetric_microbatch")
    torch.testing.assert_close(split_loss, concat_loss, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_symmetric_step_counts_both_copies(ranks, arch):
    loss_tokens = sum(float(mb.loss_mask.sum()) for mb in microbatches())
    assert last_stage_loss(ranks, arch, "symmetric_concat")[1].item() == 2 * loss_tokens
    assert last_stage_loss(ranks, arch, "uniform")[1].item() == loss_tokens


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_kind_none_equals_megatron_core_embedding(ranks, arch):
    for results in ranks:
        none, plain = results[(arch, "none")], results[(arch, "plain")]
        for name in plain["grads"]:
            assert torch.equal(none["grads"][name], plain["grads"][name]), name
    assert torch.equal(last_stage_loss(ranks, arch, "none"), last_stage_loss(ranks, arch, "plain"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_adds_exactly_the_noise_with_each_copys_sign_and_evaluation_none(ranks, arch):
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.noise.embedding_noise import embedding_noise

    first_stage = [results for results in ranks if results[(arch, "none")]["embedded"]]
    assert len(first_stage) == 2  # the two tensor-parallel ranks of stage 0

    def noise(kind, microbatch, sign):
        return embedding_noise(NoiseConfig(kind, 5.0), microbatch.sample_uids, microbatch.position_ids,
                               microbatch.lengths, 64, sign=sign)

    for results in first_stage:
        clean = results[(arch, "none")]["embedded"]
        added = {name: results[(arch, name)]["embedded"] for name in ("uniform", "symmetric_concat", "symmetric_microbatch")}
        expected = {"uniform": [], "symmetric_concat": [], "symmetric_microbatch": []}
        for index, microbatch in enumerate(microbatches()):
            expected["uniform"].append(clean[index] + noise("uniform", microbatch, 1))
            plus, minus = noise("symmetric", microbatch, 1), noise("symmetric", microbatch, -1)
            expected["symmetric_concat"].append(torch.cat([clean[index] + plus, clean[index] + minus]))
            expected["symmetric_microbatch"] += [clean[index] + plus, clean[index] + minus]
        for name, outputs in added.items():
            assert len(outputs) == len(expected[name]), name
            for got, want in zip(outputs, expected[name]):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
        evaluated = results[(arch, "symmetric_eval")]["embedded"]
        assert len(evaluated) == len(clean) and all(torch.equal(a, b) for a, b in zip(evaluated, clean))
    # ... which moves the loss; evaluation's loss is megatron-core's own, to the bit.
    plain = last_stage_loss(ranks, arch, "none")
    for noisy in ("uniform", "symmetric_concat"):
        assert not torch.equal(last_stage_loss(ranks, arch, noisy)[0], plain[0]), noisy
    assert torch.equal(last_stage_loss(ranks, arch, "symmetric_eval"), last_stage_loss(ranks, arch, "plain_eval"))


def test_tied_embedding_keeps_megatron_sharing_attributes(ranks):
    first_stage = ranks[0][("opt", "symmetric_concat")]
    assert first_stage["shared"] == [True]
