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


def test_zero_samples_kept_is_an_error_with_the_reasons(run_preprocess, write_rows, tmp_path):
    rows = [{"instruction": "x", "input": "", "output": " "}, {"instruction": "Say it.", "input": "", "output": "again " * 300}]
    with pytest.raises(ValueError) as error:
        run_preprocess([write_rows("none.jsonl", rows)], on_error="skip", seq_length=8)
    text = str(error.value)
    assert "no sample kept from 2 row(s)" in text and "'empty_response': 1" in text
    assert "'no_response_after_truncation': 1" in text and "nothing written" in text
    assert glob.glob(os.path.join(tmp_path, "out*")) == []


def test_cli_exits_non_zero_when_nothing_is_kept(tmp_path, write_rows, capsys):
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from tools.preprocess_data import main

    bad = write_rows("bad.jsonl", [BAD_ROWS["empty_response"][0]])
    args = ["--input", bad, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", BUNDLED_TOKENIZER,
            "--no-progress", "--on-error", "skip"]
    assert main(args) == 2
    assert "no sample kept" in capsys.readouterr().err


NOT_UTF8 = b'{"instruction": "caf\xe9", "input": "", "output": "Yes."}\n'


def test_non_utf8_row_is_named_or_skipped(run_preprocess, tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = (json.dumps(GOOD) + "\n").encode()
    path.write_bytes(good * 2 + NOT_UTF8 + good)
    with pytest.raises(ValueError, match=rf"{path}: row 3: not UTF-8: byte 0xe9"):
        run_preprocess([str(path)])
    meta, _ = run_preprocess([str(path)], on_error="skip")
    assert meta["samples"] == 3 and meta["skipped_rows"] == {"not_utf8": 1}


def test_non_utf8_element_of_a_json_array_is_named_or_skipped(run_preprocess, tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b"[" + json.dumps(GOOD).encode() + b",\n" + NOT_UTF8.strip() + b",\n" + json.dumps(GOOD).encode() + b"]")
    with pytest.raises(ValueError, match=rf"{path}: row 2: not UTF-8"):
        run_preprocess([str(path)])
    meta, _ = run_preprocess([str(path)], on_error="skip")
    assert meta["samples"] == 2 and meta["skipped_rows"] == {"not_utf8": 1}


def test_ids_beyond_the_vocabulary_and_paths_that_are_no_tokenizer(hf_tokenizer_dir, tmp_path, run_preprocess, write_rows):
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    with open(os.path.join(hf_tokenizer_dir, "tokenizer.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["added_tokens"].append({"id": 600, "content": "<|far|>", "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text(json.dumps(config))
    (broken / "config.json").write_text(json.dumps({"vocab_size": 600}))
    with pytest.raises(ValueError, match=rf"{broken}/tokenizer.json: token id 60\d \('<\|far\|>'\) is beyond the "
                                         rf"vocabulary of 600 declared in {broken}/config.json"):
        TokenizerSpec(directory=str(broken)).load()

    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ValueError, match=rf"{text} is not a tokenizer"):
        TokenizerSpec(model_file=str(text)).load()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ValueError, match=rf"{tmp_path}/junk/tokenizer.json is not a tokenizer"):
        run_preprocess([write_rows("ok.jsonl", [GOOD])], tokenizer=TokenizerSpec(directory=str(tmp_path / "junk")))
    with pytest.raises(ValueError, match="is a directory; pass it as --tokenizer-dir"):
        TokenizerSpec(model_file=hf_tokenizer_dir).load()


def test_read_only_output_folder_is_named_and_nothing_is_left(run_preprocess, write_rows, tmp_path, monkeypatch):
    import builtins

    from symnoise_megatron.data import preprocess

    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: answer as the kernel does to anyone else
        def refusing_open(path, mode="r", *args, **kwargs):
            if "w" in mode and os.path.dirname(os.path.abspath(path)) == str(folder):
                raise PermissionError(13, "Permission denied", path)
            return builtins.open(path, mode, *args, **kwargs)

        monkeypatch.setattr(preprocess, "open", refusing_open, raising=False)
    try:
        with pytest.raises(ValueError, match=rf"cannot write {folder}/out_tokens.tmp-\d+.bin: Permission denied"):
            run_preprocess([write_rows("ok.jsonl", [GOOD])], prefix="readonly/out")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o755)


def test_full_disk_is_named_and_partial_files_removed(run_preprocess, write_rows, tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    target = tmp_path / f"out_tokens.tmp-{os.getpid()}.bin"
    os.symlink("/dev/full", target)
    with pytest.raises(ValueError, match=rf"cannot write {target}: No space left on device"):
        run_preprocess([write_rows("ok.jsonl", [GOOD] * 50)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.jsonl"]


def test_stale_temporaries_of_dead_runs_are_removed(run_preprocess, write_rows, tmp_path, capsys):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [tmp_path / f"out_tokens.tmp-{dead}.bin", tmp_path / f"out_loss_mask.tmp-{dead}.idx", tmp_path / f"out_meta.json.tmp-{dead}"]
    alive = tmp_path / f"out_tokens.tmp-{os.getppid()}.bin"  # a run still going: kept
    for path in stale + [alive]:
        path.write_bytes(b"partial")
    meta, prefix = run_preprocess([write_rows("ok.jsonl", [GOOD])])
    assert meta["samples"] == 1
    assert not any(p.exists() for p in stale) and alive.exists()
    assert "removed 3 temporary file(s) left by interrupted runs" in capsys.readouterr().err


NOT_ALTERNATING = {
    # name: (format, conversation, what the error says of which message)
    "two_user_messages": ("sharegpt", [("human", "one"), ("human", "two"), ("gpt", "three")],
                          "[1] is from the user where the assistant should speak"),
    "two_assistant_messages": ("sharegpt", [("human", "one"), ("gpt", "two"), ("gpt", "three")],
                               "[2] is from the assistant where the user should speak"),
    "system_in_the_middle": ("messages", [("user", "one"), ("assistant", "two"), ("system", "three"),
                                          ("user", "four"), ("assistant", "five")],
                             "[2] is from the system where the user should speak"),
}


def conversation_row(format_name, messages):
    list_key, role_key, text_key = {"sharegpt": ("conversations", "from", "value"),
                                    "messages": ("messages", "role", "content")}[format_name]
    return {list_key: [{role_key: role, text_key: text} for role, text in messages]}


def conversation_rows(format_name, bad_messages, row=2, total=4):
    good = [("user", "Say yes."), ("assistant", "Yes.")] if format_name == "messages" else [("human", "Say yes."), ("gpt", "Yes.")]
    rows = [conversation_row(format_name, good) for _ in range(total)]
    rows[row - 1] = conversation_row(format_name, bad_messages)
    return rows


@pytest.mark.parametrize("case", NOT_ALTERNATING)
def test_roles_that_do_not_alternate_name_file_and_row(case, run_preprocess, write_rows):
    format_name, messages, complaint = NOT_ALTERNATING[case]
    path = write_rows("chat.jsonl", conversation_rows(format_name, messages))
    list_key = "conversations" if format_name == "sharegpt" else "messages"
    with pytest.raises(ValueError) as error:
        run_preprocess([path], turns="all", prompt_template="vicuna_v1.1")
    text = str(error.value)
    assert text.startswith(f"{path}: row 2: {list_key}{complaint}; ") and "roles must alternate" in text


@pytest.mark.parametrize("case", NOT_ALTERNATING)
def test_roles_that_do_not_alternate_are_skipped_and_counted(case, run_preprocess, write_rows):
    format_name, messages, _ = NOT_ALTERNATING[case]
    path = write_rows("chat.jsonl", conversation_rows(format_name, messages))
    meta, _ = run_preprocess([path], on_error="skip", turns="all", prompt_template="vicuna_v1.1")
    assert meta["samples"] == 3 and meta["rows_read"] == 4
    assert meta["skipped_rows"] == {"roles_not_alternating": 1}
    assert meta["skipped_examples"][0].startswith(f"{path}: row 2: ")


def test_a_leading_system_message_and_a_leading_assistant_greeting_still_read(run_preprocess, write_rows):
    from symnoise_megatron.data.formats import FORMATS

    row = conversation_row("sharegpt", [("system", "Be brief."), ("gpt", "Hi! Ask me."), ("human", "one"),
                                        ("gpt", "two"), ("human", "three"), ("gpt", "four"), ("human", "unanswered")])
    example = FORMATS["sharegpt"](row, "all")
    assert example.system == "Be brief."
    assert [(turn.user, turn.response) for turn in example.turns] == [("one", "two"), ("three", "four")]
    meta, _ = run_preprocess([write_rows("chat.jsonl", [row])], turns="all")
    assert meta["samples"] == 1 and not meta.get("skipped_rows")


def test_the_first_exchange_is_kept_whatever_follows_it(run_preprocess, write_rows):
    # --turns first (the default) uses only the first exchange: a repeated role after it is not judged.
    from symnoise_megatron.data.formats import FORMATS

    row = conversation_row("sharegpt", [("human", "one"), ("gpt", "two"), ("gpt", "two again"), ("human", "three")])
    assert [(turn.user, turn.response) for turn in FORMATS["sharegpt"](row, "first").turns] == [("one", "two")]
    meta, _ = run_preprocess([write_rows("chat.jsonl", [row])])
    assert meta["samples"] == 1 and not meta.get("skipped_rows")
    with pytest.raises(ValueError, match="roles must alternate"):
        run_preprocess([write_rows("chat.jsonl", [row])], turns="all")


def test_an_input_given_twice_is_refused_before_any_work(run_preprocess, write_rows, tmp_path):
    path = write_rows("input.jsonl", [GOOD] * 3)
    os.symlink(path, tmp_path / "link.jsonl")
    for inputs in ([path, path], [path, str(tmp_path / "link.jsonl")], [path, str(tmp_path / "*.jsonl")]):
        with pytest.raises(ValueError, match=r"^--input .* is given twice"):
            run_preprocess(inputs)
    assert glob.glob(os.path.join(tmp_path, "out*")) == []


def test_an_output_prefix_ending_in_a_separator_is_refused(run_preprocess, write_rows, tmp_path, capsys):
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from tools.preprocess_data import main

    path = write_rows("input.jsonl", [GOOD] * 3)
    prefix = str(tmp_path / "new" / "dir") + os.sep
    assert main(["--input", path, "--output-prefix", prefix, "--tokenizer-model", BUNDLED_TOKENIZER, "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error == (f"error: --output-prefix {prefix} names a directory; give a prefix such as "
                     f"{os.path.join(prefix, 'train')}\n")
    assert not os.path.exists(tmp_path / "new")
    meta, _ = run_preprocess([path], prefix=os.path.join("new", "dir", "train"))
    assert meta["samples"] == 3
