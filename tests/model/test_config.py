"""Model presets and vocabulary padding."""

import dataclasses

import pytest

from symnoise_megatron.model.config import ModelConfig, padded_vocab_size, preset


def test_vocabulary_padding_follows_megatron():
    assert padded_vocab_size(32000, 128, 1) == 32000
    assert padded_vocab_size(32001, 128, 1) == 32128
    assert padded_vocab_size(32001, 128, 8) == 32768
    assert padded_vocab_size(49152, 128, 3) == 49152


@pytest.mark.parametrize(
    "name, billions",
    [("llama1-7b", 6.74), ("llama2-7b", 6.74), ("llama2-13b", 13.0), ("llama2-70b", 69.0),
     ("llama3-8b", 8.03), ("llama3-70b", 70.6), ("opt-6.7b", 6.66)],
)
def test_presets_have_the_published_parameter_counts(name, billions):
    assert preset(name).num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)


def test_bad_shapes_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="not divisible by num_query_groups"):
        ModelConfig(num_attention_heads=9, hidden_size=576, num_query_groups=4)
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig(architecture="mistral")
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("llama4")


@pytest.mark.parametrize("name, expected", [
    ("llama2-7b", dict(normalization="RMSNorm", gated_linear_unit=True, activation="silu", linear_biases=False,
                       position_embedding_type="rope", unused_position_rows=0, hf_model_type="llama")),
    ("opt-6.7b", dict(normalization="LayerNorm", gated_linear_unit=False, activation="relu", linear_biases=True,
                      position_embedding_type="learned_absolute", unused_position_rows=2, hf_model_type="opt")),
])
def test_the_architecture_is_read_through_its_properties(name, expected):
    model = preset(name)
    assert {**dataclasses.asdict(model.traits), "hf_model_type": model.hf_model_type} == expected


def test_flops_per_token_are_six_per_parameter_plus_attention():
    model = preset("llama2-7b")
    assert model.flops_per_token(4096) == 6.0 * model.num_parameters() + 12 * 32 * 4096 * 4096
