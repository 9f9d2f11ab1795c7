"""The job's configuration: Megatron-LM flag names, a YAML/JSON file, the command line winning."""

import pytest

from symnoise_megatron.training.arguments import build_parser, parse_config


def test_megatron_flag_names_and_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor-model-parallel-size: 2\nnoise_kind: uniform\nnoise-alpha: 10\nlr: 1.0e-5\n")
    config = parse_config(["--config", str(path), "--noise-alpha", "15", "--data-path", "x", "--train-iters", "3"])
    assert config.tensor_model_parallel_size == 2 and config.noise_kind == "uniform"
    assert config.noise_alpha == 15.0  # the command line wins over the file
    assert config.lr == 1e-5 and config.data_path == ["x"] and config.train_iters == 3
    assert config.global_batch_size == 128 and config.seq_length == 512  # documented defaults


def test_unknown_config_keys_are_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"tensor_parallel": 2}')
    with pytest.raises(ValueError, match="unknown configuration keys: \\['tensor_parallel'\\]"):
        parse_config(["--config", str(path)])


def test_help_explains_the_noise_flags():
    text = build_parser().format_help()
    for flag in ("--noise-kind", "--noise-alpha", "--noise-pairing", "--tensor-model-parallel-size", "--use-distributed-optimizer"):
        assert flag in text
    assert "SymNoise" in text and "alpha / sqrt(L * d)" in text


def test_help_says_the_tokenizer_flags_only_check_the_datas_tokenizer():
    text = " ".join(build_parser().format_help().split())
    for flag in ("--override-noise-config", "--allow-tokenizer-mismatch", "--tokenizer-model", "--tokenizer-type"):
        assert flag in text
    assert "the data carries its tokenizer" in text
    config = parse_config(["--data-path", "x", "--train-iters", "1", "--tokenizer-type", "GPT2BPETokenizer"])
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer': the data can only have been tokenized by one of"):
        config.validate()
