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
