"""The run's data: --split's three parts, and what the log says about them."""

import numpy as np
import pytest

from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
from symnoise_megatron.data.tokenizer import TokenizerSpec
from symnoise_megatron.training.arguments import DataOptions
from symnoise_megatron.training.datasets import load_training_data


@pytest.fixture(scope="module")
def bundled_prefix(tmp_path_factory):
    """The bundled instruction set (316 samples), preprocessed."""
    prefix = str(tmp_path_factory.mktemp("data") / "bundled")
    preprocess(PreprocessConfig(inputs=[BUNDLED_INSTRUCTIONS], output_prefix=prefix,
                                tokenizer=TokenizerSpec(model_file=BUNDLED_TOKENIZER), progress=False))
    return prefix


def test_split_80_10_10_trains_on_80_validates_on_10_and_sets_10_aside(bundled_prefix):
    prefix = bundled_prefix
    data = load_training_data(DataOptions(data_path=[prefix], split="80,10,10"), seed=1234)
    assert len(data.train) == 316
    # 316 samples: cuts at round(252.8) = 253 and round(284.4) = 284.
    assert (len(data.train_indices), len(data.valid_indices), len(data.test_indices)) == (253, 31, 32)
    parts = [set(data.train_indices.tolist()), set(data.valid_indices.tolist()), set(data.test_indices.tolist())]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set().union(*parts) == set(range(316))
    assert data.split_description() == (
        f"--split 80,10,10 of the 316 samples of --data-path {prefix}: 253 train, 31 validation, 32 test "
        "(the test part is set aside: neither trained nor validated on)")


def test_two_weights_leave_no_test_part(bundled_prefix):
    prefix = bundled_prefix
    data = load_training_data(DataOptions(data_path=[prefix], split="98,2"), seed=1234)
    assert (len(data.train_indices), len(data.valid_indices), len(data.test_indices)) == (310, 6, 0)
    assert np.array_equal(np.sort(np.concatenate([data.train_indices, data.valid_indices])), np.arange(316))


def test_the_log_says_when_validation_and_the_split_disagree(bundled_prefix):
    held_back = load_training_data(DataOptions(data_path=[bundled_prefix], split="98,2"), seed=1234)
    assert held_back.validation_note(eval_interval=None) == (
        "--split 98,2 holds back 6 samples for validation, which never runs without --eval-interval: they are not "
        "trained on (--split 100,0 trains on every sample)")
    assert held_back.validation_note(eval_interval=10) is None
    everything = load_training_data(DataOptions(data_path=[bundled_prefix], split="100,0"), seed=1234)
    assert everything.validation_note(eval_interval=None) is None
    assert everything.validation_note(eval_interval=10) == (
        "no validation: the validation part is empty (--split 100,0), so --eval-interval 10 is skipped")


@pytest.fixture(scope="module")
def small_prefixes(tmp_path_factory):
    """30 bundled rows in the Alpaca template, the same in Vicuna's, and with another tokenizer."""
    import json

    from tests.provenance_runs import bundled_rows, preprocess_rows
    from tests.training.test_trainer import small_bpe_tokenizer

    root = tmp_path_factory.mktemp("small")
    rows = bundled_rows()[:30]
    other_tokenizer = small_bpe_tokenizer(root / "bpe")
    with open(root / "rows.json", "w") as handle:
        json.dump(rows, handle)
    preprocess(PreprocessConfig([str(root / "rows.json")], str(root / "bpe_tokens"), TokenizerSpec(directory=other_tokenizer),
                                progress=False))
    return {"alpaca": preprocess_rows(rows, str(root / "alpaca")),
            "vicuna": preprocess_rows(rows, str(root / "vicuna"), prompt_template="vicuna_v1.1"),
            "other_tokenizer": str(root / "bpe_tokens")}


def test_a_blend_splits_each_prefix_on_its_own_and_validates_on_every_prefix(bundled_prefix, small_prefixes):
    small = small_prefixes["alpaca"]
    data = load_training_data(DataOptions(data_path=["3", bundled_prefix, "1", small], split="80,20"), seed=1234)
    assert data.train_parts == [253, 24] and data.valid_parts == [63, 6]  # Megatron-LM's rule: --split per prefix
    assert data.train_weights == pytest.approx([0.75, 0.25]) and len(data.train) == 316 + 30
    # The train indices address the concatenated samples: the small prefix's lie past the bundled ones.
    assert data.train_indices[:253].max() < 316 <= data.train_indices[253:].min()
    assert data.train[int(data.train_indices[253])][0].tolist() == data.train.parts[1][int(data.train_indices[253]) - 316][0].tolist()
    alone = load_training_data(DataOptions(data_path=[small], split="80,20"), seed=1234)
    assert np.array_equal(data.train_indices[253:] - 316, alone.train_indices)  # as that prefix alone would split
    order = data.valid_order()  # validation keeps the weights, without shuffling
    drawn = [order.sample_at(n) for n in range(8)]
    assert sum(position >= 63 for position in drawn) == 2


@pytest.mark.parametrize("other", ["vicuna", "other_tokenizer"])
def test_a_blend_of_prefixes_with_other_tokenizers_or_templates_is_refused(bundled_prefix, small_prefixes, other):
    with pytest.raises(ValueError) as error:
        load_training_data(DataOptions(data_path=["0.5", bundled_prefix, "0.5", small_prefixes[other]]), seed=1234)
    assert str(error.value).startswith(f"--data-path {small_prefixes[other]} was preprocessed with another tokenizer or "
                                       f"template than --data-path {bundled_prefix}: ")


def test_a_config_file_may_write_the_weights_as_numbers(tmp_path):
    from symnoise_megatron.training.arguments import parse_config

    (tmp_path / "run.yaml").write_text("data_path: [0.7, data/a, 0.3, data/b]\ntrain_iters: 2\n")
    config = parse_config(["--config", str(tmp_path / "run.yaml")])
    assert config.data.data_path == ["0.7", "data/a", "0.3", "data/b"]
    with pytest.raises(ValueError, match="--data-path: 'x' \\(before 'data/b'\\) is not a weight"):
        parse_config(["--data-path", "0.7", "data/a", "x", "data/b", "--train-iters", "2"]).validate()


def test_a_one_sample_prefix_in_a_blend(bundled_prefix, tmp_path):
    from tests.provenance_runs import bundled_rows, preprocess_rows

    one = preprocess_rows(bundled_rows()[:1], str(tmp_path / "one"))
    data = load_training_data(DataOptions(data_path=["0.9", bundled_prefix, "0.1", one], split="98,2"), seed=1234)
    assert data.train_parts == [310, 1] and data.valid_parts == [6, 0]
    order = data.train_order(1234)  # drawn every tenth sample or so, the same sample each time
    assert {order.sample_at(n) for n in range(100) if order.sample_at(n) >= 310} == {310}
    assert [data.valid_order().sample_at(n) for n in range(6)] == list(range(6))  # validation: the big prefix only
    with pytest.raises(ValueError, match=f"--data-path {one}: none of its 1 samples is left to train on under --split 50,50"):
        load_training_data(DataOptions(data_path=["0.9", bundled_prefix, "0.1", one], split="50,50"), seed=1234)
