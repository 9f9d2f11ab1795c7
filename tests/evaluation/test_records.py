"""Evaluation files: AlpacaEval's JSON array, JSON Lines or Parquet; anything else named in one line."""

import json

import pytest

from symnoise_megatron.evaluation.records import read_records

ROWS = [{"instruction": "Name a colour.", "output": "Blue.", "dataset": "toy"},
        {"instruction": "Add 2 and 3.", "output": "5", "dataset": "toy"}]


@pytest.mark.parametrize("kind", ["json", "jsonl", "parquet"])
def test_every_format_reads_the_same_rows(tmp_path, kind):
    import datasets

    path = tmp_path / f"rows.{kind}"
    if kind == "json":
        path.write_text(json.dumps(ROWS))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    else:
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    assert read_records(str(path), "output") == ROWS


def test_a_parquet_file_without_the_field_is_named(tmp_path):
    import datasets

    path = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list([{"prompt": "Name a colour."}]).to_parquet(str(path))
    with pytest.raises(ValueError, match=f"^{path}: row 1 has no 'instruction' key$"):
        read_records(str(path), "instruction")


def test_a_binary_file_is_named_not_a_codec_error(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_bytes(b"PAR1\x15\x04\x15\xff\xfe binary")
    with pytest.raises(ValueError, match=f"^{path}: not UTF-8 text \\(byte 0xff at offset 7\\); expected a JSON array"):
        read_records(str(path), "instruction")
