"""The training dataset: reading, splitting, padding, and packing that never crosses samples."""

import os

import numpy as np
import pytest
import torch

from symnoise_megatron.data import BUNDLED_INSTRUCTIONS
from symnoise_megatron.data.preprocess import output_paths
from symnoise_megatron.data.sft_dataset import Sample, SFTIndexedData, collate, pack, split_indices
from tests.distributed import run_distributed

SEQ = 256


@pytest.fixture
def bundled_prefix(run_preprocess):
    _, prefix = run_preprocess([BUNDLED_INSTRUCTIONS], prefix="bundled")
    return prefix


def test_reads_back_what_preprocessing_wrote(bundled_prefix):
    data = SFTIndexedData(bundled_prefix)
    assert len(data) == data.meta["samples"] == 316
    tokens, mask = data[5]
    assert tokens.shape == mask.shape and mask.sum() > 0 and tokens[0] == 1


def test_incomplete_output_is_refused_with_the_file_named(bundled_prefix):
    os.remove(output_paths(bundled_prefix)["meta"])
    with pytest.raises(FileNotFoundError, match="_meta.json is missing"):
        SFTIndexedData(bundled_prefix)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SFTIndexedData(bundled_prefix + "_nothing")


def test_files_from_another_dataset_are_refused_with_the_file_named(bundled_prefix, run_preprocess):
    import json
    import shutil

    # Same rows, another template: the same sample count, other lengths.
    _, other = run_preprocess([BUNDLED_INSTRUCTIONS], prefix="other", prompt_template="vicuna_v1.1")
    ours, theirs = output_paths(bundled_prefix), output_paths(other)
    assert SFTIndexedData(other).meta["samples"] == SFTIndexedData(bundled_prefix).meta["samples"]
    with open(ours["meta"]) as handle:
        meta = json.load(handle)
    shutil.copy(theirs["tokens"] + ".idx", ours["tokens"] + ".idx")  # .idx sizes agree: only lengths differ
    with pytest.raises(ValueError, match=r"bundled_tokens\.idx describes \d+ tokens .*bundled_tokens\.bin holds \d+ bytes"):
        SFTIndexedData(bundled_prefix)
    shutil.copy(theirs["tokens"] + ".bin", ours["tokens"] + ".bin")  # now a whole other token file
    with pytest.raises(ValueError, match=r"bundled_tokens\.bin has \d+ bytes but .*bundled_meta\.json recorded \d+"):
        SFTIndexedData(bundled_prefix)
    del meta["file_bytes"]  # an older meta: the per-sample comparison still catches it
    with open(ours["meta"], "w") as handle:
        json.dump(meta, handle)
    with pytest.raises(ValueError, match=r"sample \d+ has \d+ tokens in .*bundled_tokens\.idx but \d+ loss-mask entries"):
        SFTIndexedData(bundled_prefix)


def test_an_empty_dataset_is_refused_naming_the_prefix(bundled_prefix):
    import json

    paths = output_paths(bundled_prefix)
    for key in ("tokens", "loss_mask"):
        for suffix in (".bin", ".idx"):
            open(paths[key] + suffix, "wb").close()
    with open(paths["meta"]) as handle:
        meta = json.load(handle)
    with open(paths["meta"], "w") as handle:
        json.dump(dict(meta, samples=0, file_bytes={}), handle)
    with pytest.raises(ValueError, match=f"--data-path {bundled_prefix}: the dataset is empty \\(0 samples\\)"):
        SFTIndexedData(bundled_prefix)


def test_split_is_a_seeded_partition():
    train, valid, test = split_indices(100, [98, 2], seed=1)
    assert len(train) == 98 and len(valid) == 2 and len(test) == 0
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(100))
    again, _, _ = split_indices(100, [98, 2], seed=1)
    other, _, _ = split_indices(100, [98, 2], seed=2)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


@pytest.mark.parametrize("weights, counts", [([80, 10, 10], (80, 10, 10)), ([8, 1, 1], (80, 10, 10)),
                                             ([90, 0, 10], (90, 0, 10)), ([1], (100, 0, 0))])
def test_a_third_split_weight_sets_a_test_part_aside(weights, counts):
    parts = split_indices(100, weights, seed=1)
    assert tuple(len(part) for part in parts) == counts
    assert sorted(np.concatenate(parts).tolist()) == list(range(100)), "the parts are disjoint and cover every sample"


def test_two_weights_cut_the_train_part_as_before_the_test_weight_existed():
    # The train part of 98,2 is the first 98 of the same seeded shuffle whatever the test weight.
    train, valid, _ = split_indices(316, [98, 2], seed=1234)
    order = np.random.default_rng([1234, 0x5917]).permutation(316)
    assert np.array_equal(train, np.sort(order[:310])) and np.array_equal(valid, np.sort(order[310:]))


@pytest.mark.parametrize("weights", [[80, 10, 10, 5], [], [-1, 2], [0, 0, 0]])
def test_bad_split_weights_are_refused(weights):
    with pytest.raises(ValueError, match="^--split "):
        split_indices(100, weights, seed=1)


def samples(prefix, count=7):
    data = SFTIndexedData(prefix)
    return [Sample(uid=100 + i, tokens=data[i][0], loss_mask=data[i][1]) for i in range(count)]


def test_collate_pads_without_loss_or_noise(bundled_prefix):
    batch = collate(samples(bundled_prefix, 3), SEQ)
    for row in range(3):
        n = int(batch.lengths[row])
        assert torch.all(batch.loss_mask[row, n:] == 0)
        assert torch.all(batch.position_ids[row, n:] >= n)  # padding: position >= length
        assert torch.equal(batch.labels[row, : n - 1], batch.tokens[row, 1:n])


def test_pack_keeps_every_token_and_per_sample_coordinates(bundled_prefix):
    items = samples(bundled_prefix)
    rows = pack(items, SEQ)
    assert len(rows) < len(items)
    seen = {}
    for row in rows:
        for col in range(SEQ):
            uid, pos, length = int(row.sample_uids[0, col]), int(row.position_ids[0, col]), int(row.lengths[0, col])
            if pos < length:
                seen[(uid, pos)] = int(row.tokens[0, col])
    for item in items:
        n = min(len(item.tokens), SEQ + 1) - 1
        assert [seen[(item.uid, p)] for p in range(n)] == item.tokens[:n].tolist()
    assert len(seen) == sum(min(len(i.tokens), SEQ + 1) - 1 for i in items)


def losses_packed_and_unpacked(prefix):
    from symnoise_megatron.data.microbatch import concatenate
    from symnoise_megatron.model.builder import build_gpt_model, make_transformer_config
    from symnoise_megatron.model.config import ModelConfig
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.model.step_inputs import step_inputs
    from symnoise_megatron.noise import NoiseConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    initialize_distributed(ParallelConfig())
    model_config = ModelConfig(vocab_size=1024, max_position_embeddings=SEQ)
    torch.manual_seed(0)
    model = build_gpt_model(model_config, NoiseConfig("symmetric", 5.0), make_transformer_config(model_config, ParallelConfig()))
    items = samples(prefix)
    out = {}
    for name, batch in (("unpacked", collate(items, SEQ)), ("packed", concatenate(pack(items, SEQ)))):
        per_uid = {}
        for training in (True, False):
            model.train(training)
            with torch.no_grad(), step_inputs(model, batch.noise_batch()):
                loss = model(batch.tokens, batch.position_ids, batch.attention_mask(), labels=batch.labels)
            for uid in {int(u) for u in batch.sample_uids.flatten()}:
                where = (batch.sample_uids == uid) if batch.sample_uids.dim() == 2 else (batch.sample_uids == uid)[:, None].expand_as(loss)
                per_uid[(uid, training)] = float((loss * batch.loss_mask * where).sum())
        out[name] = per_uid
    return out


@pytest.mark.distributed
def test_packing_never_crosses_samples_in_loss_or_attention(bundled_prefix):
    result = run_distributed(losses_packed_and_unpacked, 1, bundled_prefix)[0]
    assert set(result["packed"]) == set(result["unpacked"])
    for key, value in result["unpacked"].items():
        assert result["packed"][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    # Noise is on in training and changes the loss, identically packed or not.
    assert any(result["unpacked"][(u, True)] != result["unpacked"][(u, False)] for u, _ in result["unpacked"])
