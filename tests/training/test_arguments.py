"""The job's configuration: Megatron-LM flag names, a YAML/JSON file, the command line winning."""

import os

import pytest

from symnoise_megatron.training.arguments import TrainingConfig, build_parser, parse_config


def test_megatron_flag_names_and_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tensor-model-parallel-size: 2\nnoise_kind: uniform\nnoise-alpha: 10\nlr: 1.0e-5\n")
    config = parse_config(["--config", str(path), "--noise-alpha", "15", "--data-path", "x", "--train-iters", "3"])
    assert config.parallelism.tensor_model_parallel_size == 2 and config.noise.noise_kind == "uniform"
    assert config.noise.noise_alpha == 15.0  # the command line wins over the file
    assert config.optimizer.lr == 1e-5 and config.data.data_path == ["x"] and config.optimizer.train_iters == 3
    assert config.optimizer.global_batch_size == 128 and config.data.seq_length == 512  # documented defaults


def test_unknown_config_keys_are_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"tensor_parallel": 2}')
    with pytest.raises(ValueError, match="unknown configuration keys: \\['tensor_parallel'\\]") as refused:
        parse_config(["--config", str(path)])
    assert str(path) in str(refused.value)  # the file that holds them
    with pytest.raises(ValueError, match="unknown configuration keys: \\['tensor_parallel'\\]"):
        TrainingConfig.from_flags(tensor_parallel=2)


def test_later_config_files_win_and_the_command_line_over_all(tmp_path):
    data_set, layout = tmp_path / "alpaca.yaml", tmp_path / "tp2.yaml"
    data_set.write_text("noise-alpha: 5\nlr: 1.0e-5\ntensor-model-parallel-size: 1\ntrain-iters: 100\n")
    layout.write_text("tensor-model-parallel-size: 2\nsequence-parallel: true\n")
    config = parse_config(["--config", str(data_set), str(layout), "--data-path", "x", "--lr", "2e-5"])
    assert config.parallelism.tensor_model_parallel_size == 2 and config.parallelism.sequence_parallel
    assert config.noise.noise_alpha == 5.0 and config.optimizer.train_iters == 100 and config.optimizer.lr == 2e-5
    # --config given twice (a launch script's files, then the user's): all files count, in order.
    repeated = parse_config(["--config", str(data_set), "--config", str(layout), "--data-path", "x"])
    assert repeated.flags() == parse_config(["--config", str(data_set), str(layout), "--data-path", "x"]).flags()


def test_train_iters_on_the_command_line_replace_a_config_files_epochs(tmp_path):
    # A quick trial of a shipped run config (3 epochs) with --train-iters: no clash, the flag wins.
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs", "alpaca.yaml")
    config = parse_config(["--config", shipped, "--data-path", "x", "--train-iters", "20"])
    config.optimizer.validate()
    assert config.optimizer.train_iters == 20 and config.optimizer.train_epochs is None
    later = tmp_path / "short.yaml"
    later.write_text("train-iters: 7\n")
    assert parse_config(["--config", shipped, str(later), "--data-path", "x"]).optimizer.train_epochs is None
    # A later file that leaves train-iters unset (null) does not clear the earlier epochs.
    unset = tmp_path / "unset.yaml"
    unset.write_text("train-iters: null\n")
    assert parse_config(["--config", shipped, str(unset), "--data-path", "x"]).optimizer.train_epochs == 3.0
    # Both on one command line still clash.
    with pytest.raises(ValueError, match="exactly one of --train-iters and --train-epochs"):
        parse_config(["--data-path", "x", "--train-iters", "2", "--train-epochs", "1"]).optimizer.validate()


def test_config_file_values_take_their_flags_types_or_are_refused_by_name(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 5e-5\nnoise-alpha: 5\ntrain-iters: 10\nbf16: false\ndata-path: prefix\n")
    config = parse_config(["--config", str(path)])
    # YAML reads 5e-5 as a string and 5 as an int: the command line would give floats.
    assert config.optimizer.lr == 5e-5 and type(config.noise.noise_alpha) is float and config.noise.noise_alpha == 5.0
    assert config.data.data_path == ["prefix"] and config.precision.bf16 is False
    path.write_text("train-iters: 1.5\n")
    with pytest.raises(ValueError, match="train_iters: 1.5 is not what --train-iters takes"):
        parse_config(["--config", str(path)])
    path.write_text("lr: fast\n")
    with pytest.raises(ValueError, match=f"{path}: lr: 'fast'"):
        parse_config(["--config", str(path)])


def test_flat_flags_round_trip_through_the_sections():
    config = TrainingConfig.from_flags(data_path=["x"], seq_length=256, pipeline_model_parallel_size=2, noise_kind="none",
                                       save="ckpt", eval_interval=5, bf16=True, load="m")
    assert (config.data.seq_length, config.parallelism.pipeline_model_parallel_size, config.noise.noise_kind,
            config.checkpoint.save, config.logging.eval_interval, config.precision.bf16, config.model.load) == (
            256, 2, "none", "ckpt", 5, True, "m")
    assert TrainingConfig.from_flags(**config.flags()) == config
    assert set(config.flags()) == {action.dest for action in build_parser()._actions} - {"help", "config"}


@pytest.mark.parametrize("section, values, message", [
    ("data", dict(data_path=[]), "--data-path is required"),
    ("parallelism", dict(context_parallel_size=2), "--context-parallel-size > 1 is not supported"),
    ("optimizer", dict(train_iters=None), "give exactly one of --train-iters and --train-epochs"),
    ("model", dict(model="gpt-17"), "--model 'gpt-17' is not a preset"),
    ("noise", dict(noise_pairing="interleaved"), "--noise-pairing one of"),
    ("checkpoint", dict(save_interval=5), "--save-interval needs --save"),
    ("precision", dict(recompute_granularity="ful"), "--recompute-granularity 'ful': use one of full, selective"),
    ("precision", dict(fp8_format="e5m2"), "--fp8-format 'e5m2': use one of e4m3, hybrid"),
    ("precision", dict(fp8_recipe="mxfp8"), "--fp8-recipe 'mxfp8': use one of delayed, tensorwise, blockwise"),
])
def test_each_section_validates_itself(section, values, message):
    from symnoise_megatron.training.arguments import SECTIONS

    defaults = dict(data=dict(data_path=["x"]), optimizer=dict(train_iters=1))
    options = SECTIONS[section](**dict(defaults.get(section, {}), **values))
    with pytest.raises(ValueError, match=message):
        options.validate()


def test_help_explains_the_noise_flags():
    text = build_parser().format_help()
    for flag in ("--noise-kind", "--noise-alpha", "--noise-pairing", "--tensor-model-parallel-size", "--use-distributed-optimizer"):
        assert flag in text
    assert "SymNoise" in text and "alpha / sqrt(L * d)" in text
    # The paper's alpha per data set lives in the run configs, not in the help.
    assert "examples/configs/" in text and "ShareGPT 10" not in text


def test_usage_names_the_module_when_started_with_dash_m(monkeypatch):
    import symnoise_megatron.finetune as module

    monkeypatch.setattr("sys.argv", [module.__file__])
    assert build_parser().format_usage().startswith("usage: python -m symnoise_megatron.finetune ")
    monkeypatch.setattr("sys.argv", ["/venv/bin/symnoise-finetune"])
    assert build_parser().format_usage().startswith("usage: symnoise-finetune ")


def test_help_says_the_tokenizer_flags_only_check_the_datas_tokenizer():
    text = " ".join(build_parser().format_help().split())
    for flag in ("--override-noise-config", "--allow-tokenizer-mismatch", "--tokenizer-model", "--tokenizer-type"):
        assert flag in text
    assert "the data carries its tokenizer" in text
    config = parse_config(["--data-path", "x", "--train-iters", "1", "--tokenizer-type", "GPT2BPETokenizer"])
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer': the data can only have been tokenized by one of"):
        config.validate()
