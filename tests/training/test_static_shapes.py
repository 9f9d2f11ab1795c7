"""--static-shapes on real gloo ranks: every tensor handed to the model has the same shape at every
step (what TP communication overlap and CUDA graphs need), and the losses are the dynamic mode's.
The GPU-only flags it serves (--tp-comm-overlap, --cuda-graph-impl) are refused on CPU in one line."""

import pytest

from tests.distributed import run_distributed
from tests.training.test_trainer import BASE, converted_tiny, data_prefix  # noqa: F401 (fixtures)


def shapes_of(value):
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if value is None:
        return None
    if isinstance(value, (int, float, bool, str)):  # a value (a copy's sign), not a shape
        return type(value).__name__
    if hasattr(value, "__dataclass_fields__") or hasattr(value, "_fields"):
        fields = value._fields if hasattr(value, "_fields") else value.__dataclass_fields__
        return tuple((name, shapes_of(getattr(value, name))) for name in fields)
    return type(value).__name__


def train_recording_shapes(runs):
    """Per config: the losses, and per step the shapes of everything each model chunk is handed
    (its arguments, the noise batch, the loss positions), in call order."""
    from megatron.core import parallel_state

    from symnoise_megatron.model.loss_tokens import GPTModelForSFT
    from symnoise_megatron.noise.embedding import noisy_embeddings
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for kwargs in runs:
        trainer = Trainer(TrainingConfig.from_flags(**kwargs), log=lambda message: None)
        calls = []

        def record(module, args, kwargs):
            embeddings = noisy_embeddings(module)
            noise = embeddings[0].noise_batch if embeddings else None
            calls.append((shapes_of(args), shapes_of(kwargs), shapes_of(noise), shapes_of(module.loss_positions)))

        for chunk in trainer.chunks:
            for module in chunk.modules():
                if isinstance(module, GPTModelForSFT):
                    module.register_forward_pre_hook(record, with_kwargs=True)
        losses, steps = [], []
        while trainer.iteration < trainer.train_iters:
            calls.clear()
            losses.append(trainer.train_step()[0])
            trainer.iteration += 1
            steps.append(list(calls))
        trainer.close()
        out.append((losses, steps))
        parallel_state.destroy_model_parallel()
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("layout", [
    dict(tensor_model_parallel_size=2, noise_pairing="concat"),
    dict(pipeline_model_parallel_size=2, pack_sequences=True, noise_pairing="microbatch")])
def test_static_shapes_hand_the_model_one_shape_every_step_and_train_the_dynamic_losses(data_prefix, layout):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], eval_interval=None, **layout)
    ranks = run_distributed(train_recording_shapes, 2, [common, dict(common, static_shapes=True)])
    for (dynamic_losses, dynamic_steps), (static_losses, static_steps) in ranks:
        assert len(static_steps) == 4 and all(static_steps)
        # Every forward of every step: one shape (one userbuffer, one graph per layer).
        calls = [call for step in static_steps for call in step]
        assert all(call == calls[0] for call in calls), "a shape changed between forwards"
        dynamic_calls = [call for step in dynamic_steps for call in step]
        assert any(call != dynamic_calls[0] for call in dynamic_calls), "the dynamic shapes did not vary"
        if not layout.get("pack_sequences"):  # packed steps have as many micro-batches as their rows need
            assert {len(step) for step in static_steps} == {len(static_steps[0])}
        assert static_losses == pytest.approx(dynamic_losses, rel=1e-5, abs=1e-5)
    assert ranks[0][0][0] == ranks[1][0][0]  # both ranks report the step's loss


@pytest.mark.parametrize("flags, message", [
    (dict(tp_comm_overlap=True, tensor_model_parallel_size=2), "--tp-comm-overlap needs --sequence-parallel"),
    (dict(cuda_graph_scope=["attn"]), "--cuda-graph-scope needs --cuda-graph-impl"),
    (dict(cuda_graph_impl="full"), "--cuda-graph-impl 'full': use one of none, local, transformer_engine"),
    (dict(cuda_graph_impl="local", cuda_graph_scope=["full_iteration"]), "--cuda-graph-scope full_iteration: use any of"),
    (dict(cuda_graph_impl="local", recompute_granularity="full"), "--cuda-graph-impl with --recompute-granularity full"),
    (dict(cuda_graph_impl="local", pack_sequences=True), "add --cuda-graph-scope mlp"),
    (dict(cuda_graph_impl="transformer_engine", pack_sequences=True, cuda_graph_scope=["mlp"],
          pipeline_model_parallel_size=2), "use --cuda-graph-impl local"),
    (dict(cuda_graph_impl="local", cuda_graph_warmup_steps=0), "--cuda-graph-warmup-steps must be at least 1")])
def test_combinations_the_static_shape_features_cannot_run_are_refused_naming_the_flag(flags, message):
    from symnoise_megatron.training.arguments import TrainingConfig

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainingConfig.from_flags(data_path=["unused"], train_iters=1, **flags).validate_flags()


@pytest.mark.parametrize("flags, named", [
    (dict(tp_comm_overlap=True, tensor_model_parallel_size=2, sequence_parallel=True), "--tp-comm-overlap"),
    (dict(cuda_graph_impl="transformer_engine"), "--cuda-graph-impl"),
    (dict(cuda_graph_impl="local", cuda_graph_scope=["attn", "mlp"]), "--cuda-graph-impl")])
def test_userbuffers_and_cuda_graphs_are_refused_on_cpu_in_one_line_and_turn_on_static_shapes(flags, named):
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.model_chunks import check_transformer_engine_features

    config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, **flags)
    config.validate_flags()
    assert config.performance.uses_static_shapes and not TrainingConfig().performance.uses_static_shapes
    with pytest.raises(ValueError) as error:
        check_transformer_engine_features(config)
    assert named in str(error.value).split(" need")[0] and "\n" not in str(error.value)
    assert "userbuffers and no CUDA graphs" in str(error.value)


def test_the_flags_reach_megatron_cores_transformer_config():
    from symnoise_megatron.common.megatron_versions import cuda_graph_regions_field
    from symnoise_megatron.model.config import preset
    from symnoise_megatron.training.arguments import TrainingConfig, build_parser
    from symnoise_megatron.training.model_chunks import build_transformer_config, parallel_layout

    helps = {option: action.help for action in build_parser()._actions for option in action.option_strings}
    for flag in ("--static-shapes", "--tp-comm-overlap", "--cuda-graph-impl", "--cuda-graph-scope",
                 "--cuda-graph-warmup-steps"):
        assert "default" in helps[flag], flag
    config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, tensor_model_parallel_size=2,
                                       sequence_parallel=True, tp_comm_overlap=True, cuda_graph_impl="transformer_engine",
                                       cuda_graph_scope=["attn", "mlp"], cuda_graph_warmup_steps=2)
    model = preset("tiny")
    built = build_transformer_config(config, model, parallel_layout(config, model))
    assert built.tp_comm_overlap and built.cuda_graph_impl == "transformer_engine"
    # megatron-core's enums (CudaGraphScope under 0.16, CudaGraphModule under 0.19), by name.
    regions = cuda_graph_regions_field()
    assert [scope.name for scope in getattr(built, regions)] == ["attn", "mlp"] and built.cuda_graph_warmup_steps == 2
    assert built.use_te_rng_tracker  # the tracker a capture can take (runtime/parallel.py seeds it)
    plain = build_transformer_config(TrainingConfig.from_flags(data_path=["unused"], train_iters=1), model,
                                     parallel_layout(TrainingConfig(), model))
    assert not plain.tp_comm_overlap and plain.cuda_graph_impl == "none" and getattr(plain, regions) == []
    assert not plain.use_te_rng_tracker


def seeded_tracker_options(cuda_graphs):
    """What initialize_distributed hands megatron-core's CUDA seeding on a GPU (a one-rank gloo
    group here, with CUDA's answer and the seeding recorded)."""
    from unittest import mock

    from megatron.core import parallel_state, tensor_parallel

    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    seeded = {}
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch.object(tensor_parallel, "model_parallel_cuda_manual_seed",
                              lambda seed, **options: seeded.update(options, seed=seed)):
        initialize_distributed(ParallelConfig(), backend="gloo", seed=7, cuda_graphs=cuda_graphs)
    parallel_state.destroy_model_parallel()
    return seeded


@pytest.mark.distributed
def test_cuda_graphs_seed_the_rng_tracker_a_capture_can_take():
    """Megatron-LM's rule: with CUDA graphs, Transformer Engine's tracker on graph-safe generators
    (the default one swaps the global generator's state at every fork: a capture refuses it)."""
    from tests.distributed import run_distributed

    plain, graphs = run_distributed(seeded_tracker_options, 1, False)[0], run_distributed(seeded_tracker_options, 1, True)[0]
    assert graphs == {"seed": 7, "te_rng_tracker": True, "use_cudagraphable_rng": True}
    assert plain == {"seed": 7, "te_rng_tracker": False, "use_cudagraphable_rng": False}


@pytest.mark.parametrize("fp8, bf16_layers, modes", [
    (False, False, ["none"]), (True, False, ["fp8"]), (True, True, ["fp8", "none"]), (False, True, ["none"])])
def test_userbuffers_are_registered_for_each_precision_a_gemm_runs_in(monkeypatch, fp8, bf16_layers, modes):
    """An FP8 run that keeps its first and last layers in BF16 runs GEMMs of both kinds, and each
    asks Transformer Engine for the buffers of its own (a missing kind is an assertion at its
    first forward). Transformer Engine's initialize_ub recorded, as it is called."""
    import enum
    import sys
    import types

    import torch

    from symnoise_megatron.runtime.userbuffers import initialize_tp_comm_overlap, userbuffer_modes

    assert userbuffer_modes(fp8, bf16_layers) == modes
    from symnoise_megatron.training.arguments import TrainingConfig

    kept = [TrainingConfig.from_flags(first_last_layers_bf16=True, num_layers_at_start_in_bf16=start,
                                      num_layers_at_end_in_bf16=end).precision.keeps_layers_in_bf16
            for start, end in ((1, 0), (0, 1), (0, 0))]
    assert kept == [True, True, False] and not TrainingConfig().precision.keeps_layers_in_bf16
    calls = []
    base = types.SimpleNamespace(UserBufferQuantizationMode=enum.Enum("Mode", {"NONE": "none", "FP8": "fp8"}),
                                 initialize_ub=lambda **kwargs: calls.append(kwargs))
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.module = types.SimpleNamespace(base=base)
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", pytorch)
    initialize_tp_comm_overlap([8192, 64], 2, userbuffer_modes(fp8, bf16_layers), torch.float32)
    assert [mode.value for mode in calls[0]["quantization_modes"]] == modes
    assert calls[0]["dtype"] is torch.float32 and calls[0]["shape"] == [8192, 64] and calls[0]["tp_size"] == 2


def test_the_userbuffers_take_the_static_micro_batchs_tokens():
    from symnoise_megatron.runtime.userbuffers import userbuffer_shape

    assert userbuffer_shape(4096, 2, 8192) == [8192, 8192]  # a concat pair of one row
    assert userbuffer_shape(4096, 1, 8192, context_parallel_size=2) == [2048, 8192]
