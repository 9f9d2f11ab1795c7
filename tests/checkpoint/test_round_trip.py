"""HF -> megatron -> HF gives every tensor back bit for bit, and a config transformers loads."""

import json
import os

import pytest
import torch

from symnoise_megatron.checkpoint import provenance
from tests.checkpoint.conftest import HF_MODELS
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed


def tensors_of(directory):
    from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader

    reader = HFCheckpointReader(directory)
    return {name: reader.get(name) for name in reader.names()}


def back_to_hf(pairs, out_root):
    from symnoise_megatron.checkpoint.convert import megatron_to_hf

    for name, (_, megatron_dir) in pairs.items():
        megatron_to_hf(megatron_dir, os.path.join(out_root, name), max_shard_bytes=200_000, progress=False)


@pytest.fixture(scope="module")
def round_tripped(converted, tmp_path_factory):
    out_root = str(tmp_path_factory.mktemp("round_trip"))
    run_distributed(back_to_hf, 1, converted, out_root)
    return {name: os.path.join(out_root, name) for name in converted}


@pytest.mark.parametrize("name", HF_MODELS)
def test_every_tensor_comes_back_bit_identical(converted, round_tripped, name):
    original, returned = tensors_of(converted[name][0]), tensors_of(round_tripped[name])
    if HF_MODELS[name][0] == "opt":  # OPT's two unused position rows, which megatron has no room for
        assert torch.count_nonzero(original["model.decoder.embed_positions.weight"][:2]) == 2 * 64
    assert set(returned) == set(original)
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key


def test_output_is_sharded_with_an_index(round_tripped):
    directory = round_tripped["llama_gqa_untied_32001"]
    with open(os.path.join(directory, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all(os.path.exists(os.path.join(directory, f)) for f in files)


@pytest.mark.parametrize("name", ["llama_gqa_untied_32001", "llama3_rope_scaling", "opt", "llama_tied"])
def test_transformers_loads_the_same_model(converted, round_tripped, name):
    from transformers import AutoConfig, AutoModelForCausalLM

    original_config = AutoConfig.from_pretrained(converted[name][0]).to_dict()
    returned_config = AutoConfig.from_pretrained(round_tripped[name]).to_dict()
    for key in ("dtype", "torch_dtype", "transformers_version", "_name_or_path"):
        original_config.pop(key, None), returned_config.pop(key, None)
    assert returned_config == original_config
    tokens = torch.randint(0, 301, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(converted[name][0], dtype=torch.float32)(tokens).logits
        actual = AutoModelForCausalLM.from_pretrained(round_tripped[name], dtype=torch.float32)(tokens).logits
    assert torch.equal(actual, expected)


def to_hf_on_every_rank(megatron_dir, save_dir):
    from symnoise_megatron.checkpoint.convert import megatron_to_hf

    megatron_to_hf(megatron_dir, save_dir, max_shard_bytes=200_000, progress=False)


@pytest.mark.parametrize("name, ranks", [("llama_gqa_untied_32001", 2), ("opt", 3)])
def test_ranks_sharing_the_layers_write_the_same_bytes_as_one_process(converted, round_tripped, tmp_path, name, ranks):
    # 2 layers on 3 ranks: one rank reads no layer, only a global tensor, and joins the others' loads.
    run_distributed(to_hf_on_every_rank, ranks, converted[name][1], str(tmp_path / "hf"))
    one = sorted(os.listdir(round_tripped[name]))
    assert sorted(os.listdir(tmp_path / "hf")) == one and len(one) > 3
    for filename in one:
        ours, theirs = (tmp_path / "hf" / filename).read_bytes(), open(os.path.join(round_tripped[name], filename), "rb").read()
        if filename == provenance.FILE:  # when and by which command line differ; what was exported does not
            ours, theirs = ({key: value for key, value in json.loads(text).items() if key != "history"} for text in (ours, theirs))
        assert ours == theirs, filename
