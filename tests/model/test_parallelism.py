"""The pipeline split: the layers of every model chunk against megatron-core's own builder."""

import itertools
import warnings

import pytest
import torch

from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.model.parallelism import ParallelConfig, pipeline_layer_counts, validate_layout


def megatron_core_counts(num_layers, parallel):
    """megatron-core 0.16's layers per (pipeline rank, virtual stage), or None where it refuses."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    vpp = parallel.virtual_pipeline_model_parallel_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = TransformerConfig(
                num_layers=num_layers, hidden_size=8, num_attention_heads=2, pipeline_dtype=torch.float32,
                pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
                virtual_pipeline_model_parallel_size=vpp,
                num_layers_in_first_pipeline_stage=parallel.num_layers_in_first_pipeline_stage,
                num_layers_in_last_pipeline_stage=parallel.num_layers_in_last_pipeline_stage,
                account_for_embedding_in_pipeline_split=parallel.account_for_embedding_in_pipeline_split,
                account_for_loss_in_pipeline_split=parallel.account_for_loss_in_pipeline_split)
        return [[get_num_layers_to_build(config, vp_stage=stage if vpp else None, pp_rank=rank)
                 for stage in range(vpp or 1)] for rank in range(parallel.pipeline_model_parallel_size)]
    except (ValueError, AssertionError):
        return None


def ours(num_layers, parallel):
    try:
        return pipeline_layer_counts(num_layers, parallel)
    except ValueError:
        return None


SPLITS = [dict(), dict(num_layers_in_first_pipeline_stage=1), dict(num_layers_in_last_pipeline_stage=2),
          dict(num_layers_in_first_pipeline_stage=2, num_layers_in_last_pipeline_stage=4),
          dict(num_layers_in_first_pipeline_stage=6, num_layers_in_last_pipeline_stage=1),
          dict(account_for_embedding_in_pipeline_split=True), dict(account_for_loss_in_pipeline_split=True),
          dict(account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True),
          dict(num_layers_in_first_pipeline_stage=2, account_for_loss_in_pipeline_split=True)]


def test_the_layers_of_every_chunk_are_megatron_cores():
    agreed = 0
    for num_layers, pp, vpp, split in itertools.product((4, 6, 8, 10, 12, 80), (1, 2, 3, 4, 16), (None, 2, 5), SPLITS):
        if vpp and pp < 2:
            continue
        parallel = ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp, **split)
        theirs, mine = megatron_core_counts(num_layers, parallel), ours(num_layers, parallel)
        if mine is not None:
            assert mine == theirs, (num_layers, pp, vpp, split)
            assert sum(map(sum, mine)) == num_layers
            agreed += 1
        elif theirs is not None:
            # Where megatron-core builds something and this stack refuses, megatron-core's split is
            # degenerate: a chunk with no layer (or fewer than none), or first/last counts at PP 1,
            # where its builder ignores the model's layer count.
            assert pp == 1 or min(min(chunk) for chunk in theirs) <= 0, (num_layers, pp, vpp, split, theirs)
    assert agreed > 100  # the grid exercises the uneven splits, not only refusals


@pytest.mark.parametrize("split, message", [
    (dict(num_layers_in_first_pipeline_stage=1, account_for_loss_in_pipeline_split=True), "exclude each other"),
    (dict(num_layers_in_first_pipeline_stage=3, num_layers_in_last_pipeline_stage=2), "leave 3 for 2 middle"),
    (dict(num_layers_in_last_pipeline_stage=0), "--decoder-last-pipeline-num-layers must be at least 1"),
    (dict(account_for_embedding_in_pipeline_split=True), "8 layers \\(with the embedding and loss counted as layers\\)"),
])
def test_splits_megatron_core_cannot_build_are_refused_naming_the_flags(split, message):
    model = ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176)
    with pytest.raises(ValueError, match=message):
        validate_layout(model, ParallelConfig(pipeline_model_parallel_size=4, **split))


def test_an_uneven_split_lets_pipeline_stages_that_do_not_divide_the_layers_through():
    model = ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, ffn_hidden_size=176)
    with pytest.raises(ValueError, match="cannot be split into 3 pipeline stages"):
        validate_layout(model, ParallelConfig(pipeline_model_parallel_size=3))
    assert validate_layout(model, ParallelConfig(pipeline_model_parallel_size=3, num_layers_in_first_pipeline_stage=2)) \
        == [[2], [3], [3]]
    assert validate_layout(model, ParallelConfig(pipeline_model_parallel_size=3, account_for_loss_in_pipeline_split=True)) \
        == [[3], [3], [2]]
