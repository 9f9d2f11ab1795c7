"""Conversion refuses what it cannot convert, naming the file, tensor or number."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from symnoise_megatron.checkpoint.convert import check_hf_checkpoint, model_config_from_hf, read_hf_config, tokenizer_vocab_size
from symnoise_megatron.checkpoint.hf_config import UnsupportedCheckpoint
from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader
from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.model.parallelism import ParallelConfig, validate_layout
from tests.checkpoint.conftest import make_hf_model


@pytest.fixture
def hf_dir(tmp_path):
    return make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2), str(tmp_path / "hf"))


def check(directory):
    check_hf_checkpoint(HFCheckpointReader(directory), model_config_from_hf(read_hf_config(directory)))


def rewrite(directory, change):
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_good_checkpoint_passes(hf_dir):
    check(hf_dir)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedCheckpoint, match="unsupported architecture .*GPT2"):
        model_config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedCheckpoint, match="OPT variant: word_embed_proj_dim"):
        model_config_from_hf({"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512})


def test_missing_tensor(hf_dir):
    rewrite(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        check(hf_dir)


def test_extra_tensor(hf_dir):
    rewrite(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match="unexpected tensors .*q_norm"):
        check(hf_dir)


def test_shape_mismatch(hf_dir):
    rewrite(hf_dir, lambda t: t.update({"model.layers.0.mlp.down_proj.weight": torch.ones(64, 100)}))
    with pytest.raises(ValueError, match=r"down_proj.weight has shape \(64, 100\), config.json implies \(64, 128\)"):
        check(hf_dir)


def test_truncated_safetensors_file(hf_dir):
    path = os.path.join(hf_dir, "model.safetensors")
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        HFCheckpointReader(hf_dir)


def test_tokenizer_larger_than_embedding(hf_dir, tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(400)}, unk_token="w0")).save(os.path.join(hf_dir, "tokenizer.json"))
    assert tokenizer_vocab_size(hf_dir) == 400
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    with pytest.raises(ValueError, match="the tokenizer has 400 tokens but the embedding only 301 rows"):
        hf_to_megatron(hf_dir, str(tmp_path / "out"), progress=False)


def test_layouts_the_model_cannot_split_into():
    model = ModelConfig(num_layers=3, hidden_size=576, num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536)
    with pytest.raises(ValueError, match="must divide the 9 attention heads"):
        validate_layout(model, ParallelConfig(tensor_model_parallel_size=2))
    with pytest.raises(ValueError, match="3 layers cannot be split into 2 pipeline stages"):
        validate_layout(model, ParallelConfig(pipeline_model_parallel_size=2))
    validate_layout(model, ParallelConfig(tensor_model_parallel_size=3, pipeline_model_parallel_size=3))


def test_cli_exits_with_the_message(tmp_path, capsys):
    from tools.convert_checkpoint import main

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "bloom"}))
    assert main(["hf-to-megatron", "--load-dir", str(tmp_path / "bad"), "--save-dir", str(tmp_path / "o")]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_a_mistyped_or_wrong_load_dir_is_named(tmp_path, capsys):
    from tools.convert_checkpoint import main

    missing, empty = tmp_path / "lama-7b", tmp_path / "empty"
    empty.mkdir()
    assert main(["hf-to-megatron", "--load-dir", str(missing), "--save-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: {missing} is not a folder: expected a Hugging Face model directory\n"
    assert main(["hf-to-megatron", "--load-dir", str(empty), "--save-dir", str(tmp_path / "o")]) == 2
    assert f"{empty} is no Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
