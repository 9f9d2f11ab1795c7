"""Megatron-LM's performance flags: each reaches megatron-core's configs; the combinations
Megatron-LM refuses are refused naming the flag; those CPU can run train the same losses as
without them on real gloo ranks; uneven pipeline splits save checkpoints that load under even ones."""

import gc

import pytest

from symnoise_megatron.model.config import preset
from symnoise_megatron.training.arguments import TrainingConfig, build_parser
from tests.distributed import run_distributed
from tests.training.test_trainer import BASE, converted_tiny, data_prefix  # noqa: F401 (fixtures)

MEGATRON_LM_FLAGS = [
    "--overlap-grad-reduce", "--overlap-param-gather", "--ddp-bucket-size", "--no-gradient-accumulation-fusion",
    "--accumulate-allreduce-grads-in-fp32", "--recompute-method", "--recompute-num-layers", "--recompute-modules",
    "--account-for-embedding-in-pipeline-split", "--account-for-loss-in-pipeline-split",
    "--decoder-first-pipeline-num-layers", "--decoder-last-pipeline-num-layers", "--manual-gc", "--manual-gc-interval",
    "--cross-entropy-loss-fusion", "--cross-entropy-fusion-impl", "--fp8-param-gather",
    "--use-precision-aware-optimizer", "--num-virtual-stages-per-pipeline-rank",
]


def flags(**values):
    return TrainingConfig.from_flags(data_path=["unused"], train_iters=1, **values)


def built(config, num_layers=8):
    """megatron-core's TransformerConfig and DistributedDataParallelConfig for ``config``."""
    from symnoise_megatron.training.model_chunks import build_transformer_config, ddp_config, parallel_layout

    model = preset("tiny", num_layers=num_layers)
    parallel = parallel_layout(config, model)
    return build_transformer_config(config, model, parallel), ddp_config(config, parallel)


def test_the_flags_are_megatron_lms_and_their_help_states_the_defaults():
    helps = {option: action.help for action in build_parser()._actions for option in action.option_strings}
    for flag in MEGATRON_LM_FLAGS:
        assert helps.get(flag), flag
    assert "default on, as Megatron-LM does under --bf16" in helps["--accumulate-allreduce-grads-in-fp32"]
    assert helps["--manual-gc-interval"].endswith("(default: 0)")
    assert "default: megatron-core's" in helps["--ddp-bucket-size"] and "(default: None)" not in helps["--ddp-bucket-size"]


def test_the_defaults_keep_todays_training_and_add_megatron_lms_pipeline_deallocation():
    transformer, data_parallel = built(flags())
    assert transformer.gradient_accumulation_fusion and transformer.deallocate_pipeline_outputs
    assert transformer.recompute_granularity is None and not transformer.cross_entropy_loss_fusion
    assert data_parallel.grad_reduce_in_fp32 and data_parallel.bucket_size is None
    assert not (data_parallel.overlap_grad_reduce or data_parallel.overlap_param_gather or data_parallel.fp8_param_gather)


def test_each_flag_reaches_megatron_cores_configs():
    from symnoise_megatron.training.optimizer import optimizer_config

    config = flags(
        pipeline_model_parallel_size=2, num_virtual_stages_per_pipeline_rank=2, decoder_first_pipeline_num_layers=2,
        use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=12345,
        no_gradient_accumulation_fusion=True, accumulate_allreduce_grads_in_fp32=False, cross_entropy_loss_fusion=True,
        recompute_granularity="full", recompute_method="block", recompute_num_layers=2)
    transformer, data_parallel = built(config)
    assert transformer.virtual_pipeline_model_parallel_size == 2 and transformer.num_layers_in_first_pipeline_stage == 2
    assert not transformer.gradient_accumulation_fusion and transformer.cross_entropy_loss_fusion
    assert transformer.cross_entropy_fusion_impl == "native"
    assert (transformer.recompute_granularity, transformer.recompute_method, transformer.recompute_num_layers) == (
        "full", "block", 2)
    assert data_parallel.overlap_grad_reduce and data_parallel.overlap_param_gather and data_parallel.bucket_size == 12345
    assert not data_parallel.grad_reduce_in_fp32 and data_parallel.use_distributed_optimizer
    assert data_parallel.align_param_gather  # interleaved: all stages gather together, as Megatron-LM
    optimizer = optimizer_config(config)
    assert optimizer.overlap_param_gather and optimizer.use_distributed_optimizer

    transformer, _ = built(flags(pipeline_model_parallel_size=4, account_for_embedding_in_pipeline_split=True,
                                 account_for_loss_in_pipeline_split=True, recompute_granularity="selective",
                                 recompute_modules=["mlp", "core_attn"]), num_layers=6)
    assert transformer.account_for_embedding_in_pipeline_split and transformer.account_for_loss_in_pipeline_split
    assert transformer.recompute_modules == ["mlp", "core_attn"]
    # --recompute-granularity full alone: this stack's default method (megatron-core needs one).
    transformer, _ = built(flags(recompute_granularity="full"))
    assert (transformer.recompute_method, transformer.recompute_num_layers) == ("uniform", 1)
    transformer, data_parallel = built(flags(fp8_format="hybrid", fp8_param_gather=True, use_distributed_optimizer=True))
    assert transformer.fp8_param and data_parallel.fp8_param_gather


def test_the_precision_aware_optimizer_reaches_megatron_cores_optimizer_config():
    pytest.importorskip("transformer_engine", reason="megatron-core builds it only with Transformer Engine's FusedAdam")
    from symnoise_megatron.training.optimizer import optimizer_config

    optimizer = optimizer_config(flags(use_precision_aware_optimizer=True, use_distributed_optimizer=True, bf16=True,
                                       fp8_format="hybrid", fp8_recipe="tensorwise"))
    assert optimizer.use_precision_aware_optimizer and optimizer.fp8_recipe == "tensorwise"


@pytest.mark.parametrize("values, message", [
    (dict(overlap_param_gather=True, use_distributed_optimizer=True), "--overlap-param-gather needs --overlap-grad-reduce"),
    (dict(overlap_param_gather=True, overlap_grad_reduce=True), "--overlap-param-gather needs --use-distributed-optimizer"),
    (dict(fp8_param_gather=True, use_distributed_optimizer=True), "--fp8-param-gather needs --fp8-format"),
    (dict(fp8_param_gather=True, fp8_format="hybrid"), "--fp8-param-gather needs --use-distributed-optimizer"),
    (dict(use_precision_aware_optimizer=True), "--use-precision-aware-optimizer needs --use-distributed-optimizer"),
    (dict(recompute_granularity="selective", recompute_method="uniform"), "--recompute-method needs --recompute-granularity full"),
    (dict(recompute_method="block"), "--recompute-method needs --recompute-granularity full"),
    (dict(recompute_granularity="selective", recompute_num_layers=2), "--recompute-num-layers needs --recompute-granularity full"),
    (dict(recompute_granularity="full", recompute_modules=["mlp"]), "--recompute-modules needs --recompute-granularity selective"),
    (dict(recompute_granularity="selective", recompute_modules=["moe"]), "--recompute-modules moe: use any of"),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"], fp8_format="e4m3"), "--fp8-recipe delayed"),
    (dict(first_last_layers_bf16=True, fp8_format="hybrid"), "--first-last-layers-bf16 does not work with --fp8-recipe delayed"),
    (dict(manual_gc_interval=10), "--manual-gc-interval needs --manual-gc"),
    (dict(ddp_bucket_size=0), "--ddp-bucket-size must be at least 1"),
    (dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="triton"), "--cross-entropy-fusion-impl 'triton'"),
    (dict(num_layers_per_virtual_pipeline_stage=1, num_virtual_stages_per_pipeline_rank=2), "say the same thing two ways"),
    (dict(pipeline_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1, decoder_first_pipeline_num_layers=2),
     "take --num-virtual-stages-per-pipeline-rank"),
])
def test_combinations_megatron_lm_refuses_are_refused_naming_the_flag(values, message):
    with pytest.raises(ValueError, match=message):
        flags(**values).validate_flags()


@pytest.mark.parametrize("values, message", [
    (dict(pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=2, account_for_loss_in_pipeline_split=True),
     "exclude each other"),
    (dict(pipeline_model_parallel_size=2, decoder_last_pipeline_num_layers=2, recompute_granularity="full",
          recompute_num_layers=4), "--recompute-num-layers 4 with --recompute-method uniform must divide .* \\(2, 6 here\\)"),
    (dict(num_virtual_stages_per_pipeline_rank=2), "needs --pipeline-model-parallel-size 2 or more"),
    (dict(pipeline_model_parallel_size=3, num_layers_per_virtual_pipeline_stage=2, account_for_loss_in_pipeline_split=True),
     "the model's 9 layers \\(with the embedding and loss counted\\) must split"),
])
def test_layouts_megatron_core_cannot_build_are_refused_before_the_model(values, message):
    config = flags(**values)
    config.validate_flags()
    with pytest.raises(ValueError, match=message):
        built(config)


@pytest.mark.parametrize("values, flag", [
    (dict(use_precision_aware_optimizer=True, use_distributed_optimizer=True), "--use-precision-aware-optimizer"),
    (dict(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te"), "--cross-entropy-fusion-impl te"),
    (dict(recompute_granularity="selective", recompute_modules=["layernorm"]), "--recompute-modules layernorm"),
    (dict(fp8_format="hybrid", fp8_param_gather=True, use_distributed_optimizer=True), "--fp8-param-gather"),
])
def test_flags_that_need_transformer_engine_are_refused_on_cpu_in_one_line(values, flag):
    from symnoise_megatron.model.builder import transformer_engine_available
    from symnoise_megatron.training.model_chunks import check_transformer_engine_features

    if transformer_engine_available():
        pytest.skip("Transformer Engine and a GPU are here")
    config = flags(**values)
    config.validate_flags()
    with pytest.raises(ValueError, match=f"{flag}.* Transformer Engine on a GPU") as refused:
        check_transformer_engine_features(config)
    assert "\n" not in str(refused.value)


def test_interleaving_with_a_micro_batch_count_megatron_core_would_refuse_mid_run_is_refused_at_start():
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.training.model_chunks import check_interleaving

    interleaved = ParallelConfig(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=2)
    check_interleaving(interleaved, 8, doubled=False)
    check_interleaving(ParallelConfig(pipeline_model_parallel_size=4), 6, doubled=False)
    with pytest.raises(ValueError, match="groups of --pipeline-model-parallel-size 4: this step has 6 .*doubled"):
        check_interleaving(interleaved, 6, doubled=True)


# Trained on gloo ranks ------------------------------------------------------------------------
def train_and_describe(runs, log_gc=False):
    """Per config: (the losses, this rank's pipeline rank and the layers of each of its model
    chunks, whether the collector ran during the run / after it), or the ValueError's text."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from symnoise_megatron.training.loop import Trainer

    out = []
    for kwargs in runs:
        collector_on = []
        try:
            trainer = Trainer(TrainingConfig.from_flags(**kwargs), log=lambda message: collector_on.append(gc.isenabled()))
            layers = [len(get_attr_wrapped_model(chunk, "decoder").layers) for chunk in trainer.chunks]
            buckets = sum(len(chunk.bucket_groups) for chunk in trainer.chunks)
            before_run = len(collector_on)
            losses = [record["loss"] for record in trainer.run()]
            out.append((losses, parallel_state.get_pipeline_model_parallel_rank(), layers, buckets,
                        any(collector_on[before_run:]), gc.isenabled()))
        except ValueError as error:
            out.append(str(error))
        parallel_state.destroy_model_parallel()
    return out


def losses(results, index=0):
    return results[0][index][0]


@pytest.mark.distributed
def test_uneven_pipeline_splits_train_the_even_splits_losses_and_their_checkpoints_load_under_an_even_one(
        data_prefix, tmp_path):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], pipeline_model_parallel_size=2, eval_interval=None)
    splits = [dict(), dict(decoder_first_pipeline_num_layers=1), dict(decoder_last_pipeline_num_layers=1),
              dict(account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True),
              dict(num_virtual_stages_per_pipeline_rank=2, decoder_first_pipeline_num_layers=2),
              dict(decoder_first_pipeline_num_layers=3, recompute_granularity="full", recompute_method="block",
                   recompute_num_layers=2)]
    runs = [dict(common, **split) for split in splits] + [
        dict(common, save=str(tmp_path / "straight")),
        dict(common, decoder_first_pipeline_num_layers=1, save=str(tmp_path / "uneven"), exit_interval=2),
        dict(common, save=str(tmp_path / "uneven")),  # resumed under an even split
    ]
    ranks = run_distributed(train_and_describe, 2, runs)
    # 4 layers over 2 stages: 2+2, 1+3, 3+1, (4+2)/2 less the embedding and loss, 1+1 per chunk, 3+1.
    expected_layers = [[[2], [2]], [[1], [3]], [[3], [1]], [[2], [2]], [[1, 1], [1, 1]], [[3], [1]]]
    reference = losses(ranks)
    assert len(reference) == 4 and reference[-1] < reference[0]
    for index, layers in enumerate(expected_layers):
        assert [rank[index][2] for rank in ranks] == layers, splits[index]
        assert losses(ranks, index) == pytest.approx(reference, rel=2e-5, abs=2e-5), splits[index]
    straight, first_half, second_half = (losses(ranks, index) for index in (6, 7, 8))
    assert first_half == pytest.approx(straight[:2], rel=2e-5) and len(second_half) == 2
    assert second_half == pytest.approx(straight[2:], rel=2e-5, abs=2e-5)


def train_without_compiling(runs):
    # megatron-core's fused cross entropy is torch.compile'd (a minute of compiling on a CPU);
    # run eagerly, the same functions.
    import torch._dynamo

    torch._dynamo.config.disable = True
    return train_and_describe(runs)


@pytest.mark.distributed
def test_recomputation_fusions_and_manual_gc_train_the_same_losses(data_prefix):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], eval_interval=2, eval_iters=1)
    settings = [dict(), dict(no_gradient_accumulation_fusion=True),
                dict(recompute_granularity="full", recompute_num_layers=2),
                dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
                dict(recompute_granularity="selective", recompute_modules=["mlp", "core_attn"]),
                dict(cross_entropy_loss_fusion=True),
                dict(manual_gc=True, manual_gc_interval=1)]
    results = run_distributed(train_without_compiling, 1, [dict(common, **setting) for setting in settings])
    reference = losses(results)
    for index, setting in enumerate(settings):
        assert losses(results, index) == pytest.approx(reference, rel=2e-5, abs=2e-5), setting
    _, _, _, _, collector_ran, collector_after = results[0][-1]
    assert not collector_ran and collector_after  # off for the run (its log lines), given back after it
    assert results[0][0][4] and results[0][0][5]  # without --manual-gc the collector stays on


def exported_weights(megatron_dir, hf_dir):
    from safetensors.torch import load_file

    from symnoise_megatron.checkpoint.convert import megatron_to_hf

    megatron_to_hf(megatron_dir, hf_dir, progress=False)
    return load_file(f"{hf_dir}/model.safetensors")


@pytest.mark.distributed
def test_overlapped_gradient_reduction_and_parameter_gather_train_the_same_losses_and_save_the_same_weights(
        data_prefix, tmp_path):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], use_distributed_optimizer=True, eval_interval=2, eval_iters=1,
                  train_iters=3)
    overlap = dict(overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=20000)
    runs = [dict(common, save=str(tmp_path / "plain")), dict(common, **overlap, save=str(tmp_path / "overlap")),
            dict(common, use_distributed_optimizer=False, overlap_grad_reduce=True, ddp_bucket_size=20000)]
    results = run_distributed(train_and_describe, 2, runs)
    plain, overlapped, all_reduce = (results[0][index] for index in range(3))
    assert overlapped[3] > 1  # several buckets, each reduced as soon as its gradients are in
    assert overlapped[0] == pytest.approx(plain[0], rel=2e-5, abs=2e-5)
    assert all_reduce[0] == pytest.approx(plain[0], rel=2e-5, abs=2e-5)
    # The parameters are gathered before the save, not left to the next forward.
    reference = run_distributed(exported_weights, 1, str(tmp_path / "plain"), str(tmp_path / "plain_hf"))[0]
    saved = run_distributed(exported_weights, 1, str(tmp_path / "overlap"), str(tmp_path / "overlap_hf"))[0]
    assert reference.keys() == saved.keys()
    for name, tensor in reference.items():
        assert saved[name].float().allclose(tensor.float(), rtol=1e-5, atol=1e-6), name


@pytest.mark.distributed
def test_interleaved_overlap_trains_the_same_losses_and_a_split_changed_under_the_distributed_optimizer_is_named(
        data_prefix, tmp_path):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], use_distributed_optimizer=True, pipeline_model_parallel_size=2,
                  eval_interval=None)
    interleaved = dict(common, num_layers_per_virtual_pipeline_stage=1)
    runs = [interleaved, dict(interleaved, overlap_grad_reduce=True, overlap_param_gather=True, ddp_bucket_size=20000),
            dict(common, decoder_first_pipeline_num_layers=1, save=str(tmp_path / "uneven"), exit_interval=2),
            dict(common, save=str(tmp_path / "uneven"))]
    results = run_distributed(train_and_describe, 4, runs)
    assert losses(results, 1) == pytest.approx(losses(results), rel=2e-5, abs=2e-5)
    refused = results[0][3]
    assert "num_layers_in_first_pipeline_stage 1" in refused and "an even pipeline split" in refused


def train_as_on_a_gpu_without_apex(runs):
    """The GPU path's set-up on this host: megatron-core finds no apex kernel (as on a GPU image
    without apex) and the trainer is told it is not on a CPU."""
    from unittest import mock

    from megatron.core.tensor_parallel import layers

    from symnoise_megatron.training import model_chunks

    with mock.patch.object(layers, "_grad_accum_fusion_available", False), \
            mock.patch.object(layers, "fused_weight_gradient_mlp_cuda", None, create=True), \
            mock.patch.object(model_chunks, "is_cpu_only", lambda: False):
        results = train_and_describe(runs)
        return results, layers._grad_accum_fusion_available, layers.fused_weight_gradient_mlp_cuda.__name__


@pytest.mark.distributed
def test_without_apex_megatron_cores_own_layers_accumulate_weight_gradients_with_torchs_gemm(data_prefix):  # noqa: F811
    # Where apex is missing (GPU images with Transformer Engine only), megatron-core refuses to build
    # its own linear layers (the output layer of the TE spec) with the fusion: torch's GEMM stands in.
    runs = [dict(BASE, data_path=[data_prefix], eval_interval=None, train_iters=2, tensor_model_parallel_size=2)]
    (results, available, kernel), _ = run_distributed(train_as_on_a_gpu_without_apex, 2, runs)
    unfused = run_distributed(train_and_describe, 2, [dict(runs[0], no_gradient_accumulation_fusion=True)])[0]
    assert available and kernel == "TorchWgradAccumulation"
    assert results[0][0] == pytest.approx(unfused[0][0], rel=2e-5, abs=2e-5)
