"""The layout planner: parameters per rank against megatron-core's own model, the memory
rules of the pairings and the distributed optimizer, and the SLURM example's layouts."""

import re
from pathlib import Path

import pytest
import yaml

from symnoise_megatron.model.config import ModelConfig, preset
from symnoise_megatron.runtime.layout_planner import PlanInputs, plan, ranked_plans, stage_parameters
from tests.distributed import run_distributed

MODELS = {
    "llama_gqa": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                             ffn_hidden_size=176, vocab_size=1000),
    "llama_tied": ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176,
                              vocab_size=1000, tie_word_embeddings=True),
}


def parameters_per_rank(model, tp, pp):
    from megatron.core import parallel_state

    from symnoise_megatron.model.builder import build_model_chunks, make_transformer_config
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    parallel = ParallelConfig(tp, pp)
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


def test_every_ranked_layout_is_valid_and_fitting_ones_come_first():
    inputs = PlanInputs(preset("llama2-70b"), seq_length=4096, gpus=64, fp8=True)
    plans = ranked_plans(inputs)
    fits = [p.fits for p in plans]
    assert fits == sorted(fits, reverse=True) and fits[0]
    for p in plans:
        assert p.tp * p.pp * p.cp * p.dp == 64 and p.tp <= 8
        assert inputs.model.query_groups % p.tp == 0 and inputs.model.num_layers % p.pp == 0
        assert inputs.global_batch_size % p.dp == 0


def test_layouts_whose_tensor_parallelism_cannot_split_the_ffn_are_not_offered():
    def offered_tp(ffn_hidden_size):
        model = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=8, ffn_hidden_size=ffn_hidden_size)
        return {p.tp for p in ranked_plans(PlanInputs(model, seq_length=512, global_batch_size=64, gpus=8))}

    assert offered_tp(176) == {1, 2, 4, 8}
    assert offered_tp(174) == {1, 2}  # 174 = 2 x 87: TP 4 and 8 cannot split the FFN


@pytest.mark.parametrize("nodes, gpus", [(8, 64), (16, 128)])
def test_the_70b_slurm_example_uses_the_recommended_layout(nodes, gpus):
    examples = Path(__file__).parents[2] / "examples"
    layout = f"llama2-70b-fp8-{gpus}gpu"
    # examples/finetune.sh picks this layout file for this many nodes of 8 GPUs.
    assert re.search(rf"^\s*{nodes}\)\s+layout={layout} ;;", (examples / "finetune.sh").read_text(), re.M)
    values = yaml.safe_load((examples / "configs" / "layouts" / f"{layout}.yaml").read_text())
    best = ranked_plans(PlanInputs(preset("llama2-70b"), seq_length=512, global_batch_size=128, gpus=gpus,
                                   fp8=True, pairing="microbatch"))[0]
    assert (best.tp, best.pp) == (values["tensor_model_parallel_size"], values["pipeline_model_parallel_size"])
    assert values["noise_pairing"] == "microbatch"


def test_the_step_inputs_are_counted_and_the_dense_mask_only_on_the_local_spec():
    """Issue 24: every micro-batch carried a [b, 1, s, s] mask to the GPU (4.3 GB at s 4096, mbs 4,
    concat, 32 micro-batches) that the TE spec never reads; now only the local spec builds one,
    for its micro-batches in flight, and the planner counts what stays on the device."""
    from symnoise_megatron.runtime.layout_planner import INPUT_BYTES_PER_TOKEN

    model = preset("llama2-7b")
    common = dict(seq_length=4096, global_batch_size=128, micro_batch_size=4, gpus=4, pairing="concat")
    te = plan(PlanInputs(model, **common), 1, 1, 1, 4)
    local = plan(PlanInputs(model, spec="local", **common), 1, 2, 1, 2)
    # 32 samples a replica in 8 micro-batches, doubled: 64 rows of 4096 tokens, no mask.
    assert te.inputs_gb * 2 ** 30 == 64 * 4096 * INPUT_BYTES_PER_TOKEN
    assert te.total_gb == pytest.approx(te.weights_gb + te.gradients_gb + te.optimizer_gb + te.activations_gb
                                        + te.inputs_gb + 5.0)
    # PP 2 x DP 2: 64 samples a replica (128 rows doubled); 2 of its 16 micro-batches in flight on the
    # first stage, each with a mask of 8 rows of 4096^2 bytes.
    assert local.inputs_gb * 2 ** 30 == 128 * 4096 * INPUT_BYTES_PER_TOKEN + 2 * 8 * 4096 ** 2
    with pytest.raises(ValueError, match="spec must be te or local"):
        ranked_plans(PlanInputs(model, spec="TE"))
