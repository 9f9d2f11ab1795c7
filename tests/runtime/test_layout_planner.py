"""The layout planner: parameters per rank against megatron-core's own model (uneven splits
too), micro-batches in flight against megatron-core's pipeline schedules, the memory rules of
the pairings, recomputation and the distributed optimizer, what interleaving, uneven splits and
the overlap flags change, Megatron-Bridge's published layout among the candidates, and the
shipped layouts as the planner's picks."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from symnoise_megatron.model.config import ModelConfig, preset
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from symnoise_megatron.runtime.layout_planner import (
    FULL_RECOMPUTE, MLP_RECOMPUTE, NO_RECOMPUTE, PlanInputs, Recompute, compare_with_reference, plan, ranked_plans,
    reference_plans, stage_parameters,
)
from tests.distributed import run_distributed

MODELS = {
    "llama_gqa": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=176, vocab_size=1000),
    "llama_tied": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                              vocab_size=1000, tie_word_embeddings=True),
}


def parameters_per_rank(model, tp, pp, split=None):
    from megatron.core import parallel_state

    from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    parallel = ParallelConfig(tp, pp, **(split or {}))
    initialize_distributed(parallel)
    chunks = build_model_chunks(model, NoiseConfig("none"), make_transformer_config(model, parallel),
                                make_vocab_size_divisible_by=128)
    return parallel_state.get_pipeline_model_parallel_rank(), sum(p.numel() for c in chunks for p in c.parameters())


@pytest.mark.distributed
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_parameters_per_rank_match_megatron_cores_model(name, tp, pp):
    model = MODELS[name]
    for stage, count in run_distributed(parameters_per_rank, tp * pp, model, tp, pp):
        assert stage_parameters(model, tp, pp, stage) == count, (stage, count)


@pytest.mark.distributed
@pytest.mark.parametrize("split", [dict(num_layers_in_first_pipeline_stage=1),
                                   dict(account_for_embedding_in_pipeline_split=True,
                                        account_for_loss_in_pipeline_split=True, virtual_pipeline_model_parallel_size=2)])
def test_parameters_per_rank_of_an_uneven_split_match_megatron_cores_model(split):
    model = dataclasses.replace(MODELS["llama_tied"], num_layers=6)  # 1+2 and 2+1 layers per chunk with VP 2
    layers = [sum(chunks) for chunks in validate_layout(model, ParallelConfig(1, 2, **split))]
    for stage, count in run_distributed(parameters_per_rank, 2, model, 1, 2, split):
        assert stage_parameters(model, 1, 2, stage, layers=layers[stage]) == count, (stage, count)


@pytest.mark.parametrize("pp, vpp", [(2, None), (4, None), (4, 2), (4, 5), (8, 3)])
def test_micro_batches_in_flight_are_megatron_cores_warm_up(pp, vpp):
    """Each pipeline rank's peak of stored forwards is its schedule's warm-up plus one, as
    megatron-core 0.16 counts the warm-up (micro-batch groups of PP under interleaving)."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    from symnoise_megatron.runtime.layout_planner import _chunk_forwards_in_flight

    for rank in range(pp):
        for microbatches in (pp, 2 * pp, 8 * pp):
            group = SimpleNamespace(size=lambda: pp, rank=lambda rank=rank: rank)
            communicator = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vpp)
            total, _, warmup, _ = get_pp_rank_microbatches(microbatches, vpp or 1, pp, p2p_communicator=communicator)
            assert _chunk_forwards_in_flight(pp, vpp, rank, microbatches) == min(total, warmup + 1), (rank, microbatches)
    # Rank 0 under interleaving: Megatron-LM's memory penalty PP (1 + (PP - 1) / (PP V)) in whole-rank units.
    if vpp:
        assert _chunk_forwards_in_flight(pp, vpp, 0, 64) / vpp == pytest.approx(pp * (1 + (pp - 1) / (pp * vpp)))


def test_pairing_and_distributed_optimizer_memory_rules():
    model = preset("llama2-7b")
    concat = plan(PlanInputs(model, gpus=8, pairing="concat"), 1, 1, 1, 8)
    split = plan(PlanInputs(model, gpus=8, pairing="microbatch"), 1, 1, 1, 8)
    single = plan(PlanInputs(model, gpus=8, pairing="none"), 1, 1, 1, 8)
    assert concat.activations_gb == pytest.approx(2 * split.activations_gb)
    assert split.activations_gb == pytest.approx(single.activations_gb)
    assert split.step_seconds > single.step_seconds * 1.9  # both copies are computed either way
    unsharded = plan(PlanInputs(model, gpus=8, distributed_optimizer=False), 1, 1, 1, 8)
    assert unsharded.optimizer_gb == pytest.approx(8 * concat.optimizer_gb)
    full = plan(PlanInputs(model, gpus=8, recompute="full"), 1, 1, 1, 8)
    assert full.activations_gb < concat.activations_gb / 4
    bf16_grads = plan(PlanInputs(model, gpus=8, grad_reduce_in_fp32=False), 1, 1, 1, 8)
    assert bf16_grads.gradients_gb == pytest.approx(concat.gradients_gb / 2)


def test_recomputation_trades_memory_for_time_in_order():
    inputs = PlanInputs(preset("llama2-70b"), seq_length=4096, gpus=32, fp8=True, pairing="none")
    parallel = ParallelConfig(4, 4, 5, True)
    by_choice = {choice.name: plan(inputs, 4, 4, 1, 2, parallel=parallel, recompute=choice)
                 for choice in (NO_RECOMPUTE, MLP_RECOMPUTE, Recompute("full", num_layers=1),
                                Recompute("full", num_layers=2), FULL_RECOMPUTE)}
    memory = [by_choice[name].activations_gb for name in ("none", "full block 1", "full block 2", "full")]
    assert memory == sorted(memory, reverse=True) and by_choice["mlp"].activations_gb < memory[0]
    assert by_choice["none"].time["recompute"] == 0
    assert by_choice["full block 1"].time["recompute"] < by_choice["full block 2"].time["recompute"] \
        < by_choice["full"].time["recompute"]
    # The planner picks the fastest that fits: here none fits (estimate) with BF16 gradients, not with FP32.
    bf16 = dict(grad_reduce_in_fp32=False)
    assert plan(PlanInputs(**{**inputs.__dict__, **bf16}), 4, 4, 1, 2, parallel=parallel).fits


def test_virtual_stages_shrink_the_bubble_and_uneven_splits_balance_the_output_layer():
    inputs = PlanInputs(preset("llama3-70b"), seq_length=512, gpus=128, fp8=True, pairing="microbatch")
    plain = plan(inputs, 4, 16, 1, 2)
    interleaved = plan(inputs, 4, 16, 1, 2, parallel=ParallelConfig(4, 16, 5, True))
    assert interleaved.time["bubble"] == pytest.approx(plain.time["bubble"] / 5, rel=0.02)
    assert interleaved.time["pipeline"] == pytest.approx(5 * plain.time["pipeline"])  # 5 chunk boundaries
    assert interleaved.activations_gb > plain.activations_gb  # more forwards in flight on rank 0
    # LLaMA-3's 128K-token output layer makes the last of 16 stages the slowest; a lighter last
    # stage (and a heavier first, whose embedding costs no FLOPs) balances it.
    uneven = plan(inputs, 4, 16, 1, 2, parallel=ParallelConfig(4, 16, None, True, num_layers_in_first_pipeline_stage=6,
                                                               num_layers_in_last_pipeline_stage=4))
    assert plain.time["imbalance"] > 0.15 * plain.time["compute"]
    assert uneven.time["imbalance"] < plain.time["imbalance"] and uneven.step_seconds < plain.step_seconds


def test_the_overlap_flags_hide_the_data_parallel_exchange():
    # Within one micro-batch's backward (the reduction) and forward (the gather): all but a bucket's share.
    inputs = PlanInputs(preset("llama2-7b"), seq_length=512, gpus=8, micro_batch_size=4)
    overlapped, exposed = plan(inputs, 1, 1, 1, 8, overlap=True), plan(inputs, 1, 1, 1, 8, overlap=False)
    assert overlapped.time["data parallel"] < exposed.time["data parallel"] / 20
    assert overlapped.run_config()["overlap_grad_reduce"] and "overlap_grad_reduce" not in exposed.run_config()
    # 64 micro-batches a step: the last one's backward and the first one's forward hide only part of it.
    inputs = PlanInputs(preset("llama2-70b"), seq_length=512, gpus=64, fp8=True, pairing="microbatch")
    overlapped, exposed = plan(inputs, 2, 8, 1, 4, overlap=True), plan(inputs, 2, 8, 1, 4, overlap=False)
    microbatch = (overlapped.step_seconds - overlapped.time["data parallel"] - overlapped.time["pipeline"]
                  - overlapped.time["bubble"]) / 64
    assert exposed.time["data parallel"] - overlapped.time["data parallel"] == pytest.approx(microbatch, rel=0.05)
    assert not plan(inputs, 8, 8, 1, 1).overlap  # nothing to overlap without data parallelism


def test_megatron_bridges_70b_sft_layout_is_a_candidate_and_the_pick_at_its_settings():
    """Bridge's LLaMA-3-70B SFT recipe (TP 4 x PP 4 x VP 5, seq 4096, 32 H100, BF16 gradient
    reduction); at this stack's FP32 gradient reduction the planner says why it picks otherwise."""
    bridge = PlanInputs(preset("llama3-70b"), seq_length=4096, global_batch_size=32, gpus=32, fp8=True,
                        pairing="none", grad_reduce_in_fp32=False)
    best = ranked_plans(bridge)[0]
    assert (best.tp, best.pp, best.vpp, best.recompute) == (4, 4, 5, NO_RECOMPUTE)
    [(reference, planned, published)] = reference_plans(bridge)
    assert published is None and "the planner's pick too" in compare_with_reference(best, reference, planned, None, 73.6)

    ours = PlanInputs(**{**bridge.__dict__, "grad_reduce_in_fp32": True})
    best = ranked_plans(ours)[0]
    [(reference, planned, published)] = reference_plans(ours)
    assert (planned.tp, planned.pp, planned.vpp) == (4, 4, 5) and not planned.fits and published.fits
    line = compare_with_reference(best, reference, planned, published, 73.6)
    assert "does not fit by this estimate" in line and "With its published BF16 gradient reduction" in line
    assert reference_plans(PlanInputs(preset("llama2-7b"), gpus=8))[0][0].name.startswith("Megatron-Bridge's LLaMA-3-8B")


def test_every_ranked_layout_is_valid_and_fitting_ones_come_first():
    inputs = PlanInputs(preset("llama2-70b"), seq_length=4096, gpus=64, fp8=True)
    plans = ranked_plans(inputs)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and fits[0]
    for p in plans:
        assert p.tp * p.pp * p.cp * p.dp == 64 and p.tp <= 8
        assert inputs.model.query_groups % p.tp == 0
        assert sum(map(sum, validate_layout(inputs.model, p.parallel))) == inputs.model.num_layers
        assert inputs.global_batch_size % p.dp == 0
        if p.vpp:  # megatron-core's interleaved schedule: PP above 2, micro-batches a multiple of PP
            assert p.pp > 2 and inputs.global_batch_size // p.dp % p.pp == 0
    assert {p.vpp for p in plans} > {None} and {p.split for p in plans} > {"even"}


def test_layouts_whose_tensor_parallelism_cannot_split_the_ffn_are_not_offered():
    def offered_tp(ffn_hidden_size):
        model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=8, ffn_hidden_size=ffn_hidden_size)
        return {p.tp for p in ranked_plans(PlanInputs(model, seq_length=512, global_batch_size=64, gpus=8))}

    assert offered_tp(176) == {1, 2, 4, 8}
    assert offered_tp(174) == {1, 2}  # 174 = 2 x 87: TP 4 and 8 cannot split the FFN


# The keys a layout file takes from the planner (the rest: precision, pairing, micro-batch).
PLANNED_KEYS = {"tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                "sequence_parallel", "num_virtual_stages_per_pipeline_rank", "decoder_first_pipeline_num_layers",
                "decoder_last_pipeline_num_layers", "account_for_embedding_in_pipeline_split",
                "account_for_loss_in_pipeline_split", "recompute_granularity", "recompute_method",
                "recompute_num_layers", "recompute_modules", "overlap_grad_reduce", "overlap_param_gather"}
DEFAULTS = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}


def planned_keys(values):
    return {key: value for key, value in {**DEFAULTS, **values}.items() if key in PLANNED_KEYS}


@pytest.mark.parametrize("layout, nodes, inputs", [
    ("llama2-70b-fp8-64gpu", 8, dict(model="llama2-70b", gpus=64, fp8=True, pairing="microbatch")),
    ("llama2-70b-fp8-128gpu", 16, dict(model="llama2-70b", gpus=128, fp8=True, pairing="microbatch")),
    ("llama2-7b", None, dict(model="llama2-7b", gpus=8, micro_batch_size=4, pairing="concat")),
])
def test_the_shipped_layouts_are_the_planners_first_picks(layout, nodes, inputs):
    examples = Path(__file__).parents[2] / "examples"
    script = (examples / "finetune.sh").read_text()
    if nodes:  # examples/finetune.sh picks this layout file for this many nodes of 8 GPUs
        assert re.search(rf"^\s*{nodes}\)\s+layout={layout} ;;", script, re.M)
    else:
        assert re.search(rf"^\s*{layout}\) layout={layout} ", script, re.M)
    text = (examples / "configs" / "layouts" / f"{layout}.yaml").read_text()
    values = yaml.safe_load(text)
    planner_inputs = PlanInputs(preset(inputs.pop("model")), seq_length=512, global_batch_size=128, **inputs)
    best = ranked_plans(planner_inputs)[0]
    assert best.fits and planned_keys(values) == planned_keys(best.run_config())
    assert values["noise_pairing"] == planner_inputs.pairing and values["use_distributed_optimizer"]
    assert values.get("micro_batch_size", 1) == planner_inputs.micro_batch_size
    assert bool(values.get("fp8_format")) == planner_inputs.fp8


def test_the_resident_inputs_are_counted_and_the_dense_mask_only_on_the_local_spec():
    """Issue 24: every micro-batch carried a [b, 1, s, s] mask to the GPU (4.3 GB at s 4096, mbs 4,
    concat, 32 micro-batches) that the TE spec never reads; now only the local spec builds one,
    for its micro-batches in flight. Issue 26: a micro-batch moves just before its first forward,
    so the device holds those of the forwards in flight and the one moving, not the whole step's."""
    from symnoise_megatron.runtime.layout_planner import INPUT_BYTES_PER_TOKEN

    model = preset("llama2-7b")
    common = dict(seq_length=4096, global_batch_size=128, micro_batch_size=4, gpus=4, pairing="concat")
    te = plan(PlanInputs(model, **common), 1, 1, 1, 4)
    local = plan(PlanInputs(model, spec="local", **common), 1, 2, 1, 2)
    # 8 micro-batches of 8 rows (doubled) a replica; one forward in flight and the next moving: 2 of
    # them (the whole step's 64 rows before).
    assert te.inputs_gb * 2 ** 30 == 2 * 8 * 4096 * INPUT_BYTES_PER_TOKEN
    assert te.total_gb == pytest.approx(te.weights_gb + te.gradients_gb + te.optimizer_gb + te.activations_gb
                                        + te.inputs_gb + 5.0)
    # PP 2 x DP 2: 16 micro-batches a replica; 2 in flight on the first stage, each with a mask of 8
    # rows of 4096^2 bytes, and one moving.
    assert local.inputs_gb * 2 ** 30 == 3 * 8 * 4096 * INPUT_BYTES_PER_TOKEN + 2 * 8 * 4096 ** 2
    # Never more than the step has: one micro-batch a replica.
    single = plan(PlanInputs(model, **dict(common, global_batch_size=16)), 1, 1, 1, 4)
    assert single.inputs_gb * 2 ** 30 == 8 * 4096 * INPUT_BYTES_PER_TOKEN
    with pytest.raises(ValueError, match="spec must be te or local"):
        ranked_plans(PlanInputs(model, spec="TE"))
