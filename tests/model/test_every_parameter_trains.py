"""The guard for every fast path to come: one training step gives every trainable parameter a
non-zero gradient and moves it.

Issue 24's fused kernel cut the embedding off from its gradient on CUDA; losses still fell (the
layers trained), so nothing noticed. Here, on TP 2 x PP 2 x DP 2 (8 gloo ranks), a tied and an
untied model take one step per noise kind and path (the fused kernel under Triton's interpreter,
or the torch reference), and each rank reports, per parameter it holds, whether the step's
reduced gradient was non-zero and whether the parameter changed."""

import os

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

# (noise kind, pairing, fused kernel) per model: untied, every kind, both pairings, both paths;
# tied (its output layer feeds the embedding's gradient too) with full recomputation, both paths.
CASES = {
    False: [("none", "concat", False), ("uniform", "concat", True), ("gaussian", "concat", False),
            ("bernoulli", "concat", True), ("symmetric", "concat", True), ("symmetric", "microbatch", False)],
    True: [("symmetric", "concat", True), ("uniform", "concat", False)],
}


def parameters_after_one_step(prefix):
    """{(tied, case): {parameter name: (gradient non-zero, parameter changed)}} on this rank."""
    os.environ["TRITON_INTERPRET"] = "1"  # the fused kernel runs on CPU (before its first import)
    import dataclasses
    from unittest import mock

    import torch
    from megatron.core import parallel_state

    from symnoise_megatron.noise.config import NoiseConfig
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.training import loop
    from symnoise_megatron.training.arguments import TrainingConfig

    results = {}
    for tied in (False, True):
        shape = loop.resolve_model_config
        tie = mock.patch.object(loop, "resolve_model_config",
                                lambda *a: dataclasses.replace(shape(*a), tie_word_embeddings=tied))
        config = TrainingConfig.from_flags(
            data_path=[prefix], seq_length=64, micro_batch_size=2, global_batch_size=8, train_iters=len(CASES[tied]),
            lr=1e-3, lr_warmup_fraction=0.0, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
            recompute_granularity="full" if tied else None, log_interval=10 ** 6, split="100,0")
        with tie:
            trainer = loop.Trainer(config, log=lambda message: None)
        named = [(name, param) for chunk in trainer.chunks for name, param in global_names(chunk.module)
                 if param.requires_grad]
        for kind, pairing, fused in CASES[tied]:
            trainer.noise = NoiseConfig(kind, 5.0, 1234, pairing)
            for embedding in noisy_embeddings(trainer.chunks):
                embedding.noise_config, embedding.use_fused_noise = trainer.noise, fused
            before = [param.detach().clone() for _, param in named]
            trainer.train_step()
            results[tied, (kind, pairing, fused)] = {
                name: (bool(param.main_grad.abs().sum() > 0), not torch.equal(param.detach(), old))
                for (name, param), old in zip(named, before)}
        parallel_state.destroy_model_parallel()
    return results


def global_names(chunk):
    """(name, parameter) with each transformer layer named by its number in the whole model
    ('layer 2.mlp.linear_fc1.weight'): a pipeline stage numbers its own layers from 0."""
    names = {param: name for name, param in chunk.named_parameters()}
    for layer in chunk.decoder.layers:
        for name, param in layer.named_parameters():
            names[param] = f"layer {layer.layer_number}.{name}"
    return [(name, param) for param, name in names.items()]


def test_one_step_moves_every_trainable_parameter(short_rows_prefix):
    per_rank = run_distributed(parameters_after_one_step, 8, short_rows_prefix)
    for tied, cases in CASES.items():
        for case in cases:
            held = {}
            for rank_results in per_rank:
                for name, verdict in rank_results[tied, case].items():
                    held.setdefault(name, []).append(verdict)
            # What the ranks hold together: the embedding, every layer (its attention, MLP and norms),
            # the final norm and the output layer (under PP 2 a tied one is the last stage's copy).
            assert set(held) == {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                                 "output_layer.weight"} | {
                f"layer {number}.{name}" for number in (1, 2) for name in (
                    "input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                    "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")}
            assert all(len(verdicts) == 4 for verdicts in held.values())  # 2 TP ranks x 2 DP replicas of each stage
            stuck = {name: verdicts for name, verdicts in held.items() if not all(all(v) for v in verdicts)}
            assert not stuck, f"tied={tied}, {case}: (non-zero gradient, changed) per rank: {stuck}"
