"""Bad input: a clear error naming file and row, or skipped and counted; no half-written output."""

import glob
import json
import os

import pytest

from symnoise_megatron.data.preprocess import output_paths

GOOD = {"instruction": "Say yes.", "input": "", "output": "Yes."}
BAD_ROWS = {
    # reason: (the bad line, what the message says)
    "malformed_json": ('{"instruction": "x", "output": \n', "malformed JSON"),
    "missing_key": (json.dumps({"instruction": "No answer here."}) + "\n", "missing key 'output'"),
    "empty_response": (json.dumps({"instruction": "x", "input": "", "output": "  "}) + "\n", "empty response"),
    "not_a_string": (json.dumps({"instruction": "x", "input": "", "output": 42}) + "\n", "'output' is a int"),
    "not_an_object": ("[1, 2]\n", "expected a JSON object"),
}


def lines_with(bad_line, row=3, total=6):
    lines = [json.dumps(GOOD) + "\n"] * total
    lines[row - 1] = bad_line
    return lines


@pytest.mark.parametrize("reason", BAD_ROWS)
def test_fail_names_file_and_row(reason, run_preprocess, write_rows):
    line, message = BAD_ROWS[reason]
    path = write_rows("input.jsonl", lines_with(line))
    with pytest.raises(ValueError) as error:
        run_preprocess([path])
    text = str(error.value)
    assert text.startswith(f"{path}: row 3: ") and message in text


@pytest.mark.parametrize("reason", BAD_ROWS)
def test_skip_counts_the_row(reason, run_preprocess, write_rows):
    line, _ = BAD_ROWS[reason]
    meta, _ = run_preprocess([write_rows("input.jsonl", lines_with(line))], on_error="skip")
    assert meta["samples"] == 5 and meta["rows_read"] == 6
    assert meta["skipped_rows"] == {reason: 1}
    assert meta["skipped_examples"][0].endswith(BAD_ROWS[reason][1]) or BAD_ROWS[reason][1] in meta["skipped_examples"][0]


def test_unknown_format_and_missing_files(run_preprocess, write_rows, tmp_path):
    with pytest.raises(ValueError, match="cannot tell the data format from the columns"):
        run_preprocess([write_rows("odd.jsonl", [{"question": "q", "answer": "a"}])])
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_preprocess([str(tmp_path / "missing.jsonl")])
    meta, _ = run_preprocess([write_rows("odd.jsonl", [{"question": "q", "answer": "a"}])],
                             prompt_key="question", response_key="answer", prompt_template="none")
    assert meta["samples"] == 1


def test_malformed_json_array_names_line_and_column(run_preprocess, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": }\n]')
    with pytest.raises(ValueError, match=r"broken.json: malformed JSON at line 3, column"):
        run_preprocess([str(path)])


def test_failed_run_leaves_no_output_and_keeps_the_previous_one(run_preprocess, write_rows, tmp_path):
    good = write_rows("good.jsonl", [GOOD] * 4)
    meta, prefix = run_preprocess([good])
    before = {p: open(p, "rb").read() for p in glob.glob(prefix + "*")}
    bad = write_rows("bad.jsonl", lines_with(BAD_ROWS["missing_key"][0], row=900, total=1000))
    with pytest.raises(ValueError):
        run_preprocess([bad], chunk_rows=100)
    after = {p: open(p, "rb").read() for p in glob.glob(prefix + "*")}
    assert after == before, "a failed run must not touch the last complete output"
    with pytest.raises(ValueError):
        run_preprocess([bad], prefix="fresh", chunk_rows=100)
    assert glob.glob(os.path.join(tmp_path, "fresh*")) == []


def test_cli_reports_errors_and_throughput(tmp_path, write_rows, capsys):
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from tools.preprocess_data import main

    bad = write_rows("bad.jsonl", lines_with(BAD_ROWS["empty_response"][0]))
    args = ["--input", bad, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", BUNDLED_TOKENIZER, "--no-progress"]
    assert main(args) == 2
    assert f"{bad}: row 3: empty response" in capsys.readouterr().err
    assert main(args + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert '"skipped_rows": {"empty_response": 1}' in out and "tokens/s" in out
    assert os.path.exists(output_paths(str(tmp_path / "cli"))["meta"])
