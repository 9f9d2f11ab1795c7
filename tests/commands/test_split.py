"""symnoise-split: an output never overwrites the input or the other output, and a failure writes nothing."""

import json
import os

import pytest

from symnoise_megatron.commands.split import main

ROWS = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "all.json"
    path.write_text(json.dumps(ROWS))
    return path


def split(source, train, held_out):
    return main(["--input", str(source), "--held-out", "5", "--train-output", str(train), "--held-out-output", str(held_out)])


@pytest.mark.parametrize("clash", ["train_is_input", "held_out_is_input", "outputs_are_one_file"])
def test_an_output_that_is_the_input_or_the_other_output_is_refused(clash, source, tmp_path, capsys):
    other = tmp_path / "other.json"
    train, held_out, flags = {
        "train_is_input": (source, other, ("--input", "--train-output")),
        "held_out_is_input": (other, source, ("--input", "--held-out-output")),
        "outputs_are_one_file": (other, tmp_path / "." / "other.json", ("--train-output", "--held-out-output")),
    }[clash]
    before = source.read_text()
    assert split(source, train, held_out) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    assert all(flag in error for flag in flags), error
    assert source.read_text() == before and not other.exists()


def test_an_output_that_is_a_folder_is_refused_and_nothing_written(source, tmp_path, capsys):
    folder, train = tmp_path / "held_out", tmp_path / "train.json"
    folder.mkdir()
    train.write_text("old")
    assert split(source, train, folder) == 2
    assert capsys.readouterr().err == f"error: --held-out-output {folder} is a folder; give the file to write\n"
    assert train.read_text() == "old" and os.listdir(folder) == []


def test_a_link_to_the_input_is_the_input(source, tmp_path, capsys):
    link = tmp_path / "link.json"
    os.symlink(source, link)
    assert split(source, link, tmp_path / "held.json") == 2
    assert "--train-output" in capsys.readouterr().err
    assert json.loads(source.read_text()) == ROWS


def test_missing_output_folders_are_created(source, tmp_path):
    train, held_out = tmp_path / "new" / "train.json", tmp_path / "newer" / "deep" / "held.json"
    assert split(source, train, held_out) == 0
    assert len(json.loads(train.read_text())) == 15 and len(json.loads(held_out.read_text())) == 5
    assert json.loads(source.read_text()) == ROWS


def test_a_failed_write_leaves_every_file_as_it_was(source, tmp_path, capsys):
    train = tmp_path / "train.json"
    train.write_text("the previous train file")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert split(source, train, blocker / "held.json") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: --held-out-output {blocker / 'held.json'}: cannot write")
    assert train.read_text() == "the previous train file", "the train output is written only with the held-out one"
    assert json.loads(source.read_text()) == ROWS
    assert sorted(os.listdir(tmp_path)) == ["a_file", "all.json", "train.json"], "no temporary is left"


def test_a_bad_split_writes_nothing(source, tmp_path):
    train, held_out = tmp_path / "train.json", tmp_path / "held.json"
    assert main(["--input", str(source), "--held-out", "20", "--train-output", str(train),
                 "--held-out-output", str(held_out)]) == 2
    assert not train.exists() and not held_out.exists()
