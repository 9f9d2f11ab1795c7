"""symnoise-inspect on every kind of path it reads, as text and as JSON, and one line (exit 2) on
anything else: a truncated or foreign file, a folder of another kind, a path that is not there."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from symnoise_megatron.commands.inspect_path import main

pytestmark = pytest.mark.distributed  # the chain it inspects is trained on spawned ranks


def inspect(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def block(capsys, path):
    code, out, err = inspect(capsys, path)
    assert code == 0 and not err, err
    return out


def test_a_training_run_and_one_of_its_iterations(provenance_run, capsys):
    run, a, b = provenance_run["run"], provenance_run["a"], provenance_run["b"]
    text = block(capsys, run)
    lines = text.splitlines()
    assert lines[0] == f"{run}: training checkpoint, latest iteration 2"
    assert "  iterations  1, 2" in lines
    assert "  model       llama: 2 layers, hidden 64, 4 heads (2 key/value groups), FFN 128, vocabulary 1024" in lines
    assert f"              from {provenance_run['megatron']} (converted from {provenance_run['hf']})" in lines
    data = [line for line in lines if line.startswith("  data ")][0]
    assert data.startswith(f"  data        0.7 {a} (200 samples, digest ") and f" + 0.3 {b} (116 samples, digest " in data
    assert ("              split 98,2, seed 1234; seq-length 128, one sample per row; global batch 8, micro-batch 2"
            in lines)
    assert "  noise       symmetric, alpha 5.0, seed 1234, concat pairing" in lines
    assert "  precision   fp32" in lines and "  saved under TP 1, PP 1, DP 1 (1 rank)" in lines
    assert [line for line in lines if line.startswith("  versions    Python ")]
    assert [line for line in lines if line.startswith("  history     iteration 0: start ")]
    one = block(capsys, os.path.join(run, "iter_0000001")).splitlines()
    assert one[0] == f"{os.path.join(run, 'iter_0000001')}: iteration 1 of a training run (latest: 2)"
    assert data in one
    code, out, _ = inspect(capsys, "--json", run)
    report = json.loads(out)
    assert code == 0 and report["kind"] == "training checkpoint" and report["iterations"] == [1, 2]
    with open(os.path.join(run, "iter_0000002", "symnoise_provenance.json")) as handle:
        assert report["provenance"] == json.load(handle)


def test_a_converted_checkpoint_a_prefix_an_export_and_answers(provenance_run, capsys):
    megatron, hf = provenance_run["megatron"], provenance_run["hf"]
    for path in (megatron, os.path.join(megatron, "release")):
        lines = block(capsys, path).splitlines()
        assert lines[0] == f"{path}: converted checkpoint" and f"  converted   from {hf} (dtype as stored)" in lines
    a = provenance_run["a"]
    with open(a + "_meta.json") as handle:
        meta = json.load(handle)
    for path in (a, a + "_meta.json", a + "_tokens.idx"):
        lines = block(capsys, path).splitlines()
        assert lines[0] == f"{a}: preprocessed prefix"
        assert lines[1].startswith(f"  samples     {meta['samples']} of {meta['rows_read']} rows ({meta['tokens']} tokens")
    report = json.loads(inspect(capsys, "--json", a)[1])
    assert report["identity"]["file_bytes"]["a_tokens.bin"] == os.path.getsize(a + "_tokens.bin")
    exported = block(capsys, provenance_run["hf_export"]).splitlines()
    assert exported[0] == f"{provenance_run['hf_export']}: Hugging Face directory"
    assert f"  exported    from {provenance_run['run']} at iteration 2" in exported
    assert "  noise       symmetric, alpha 5.0, seed 1234, concat pairing" in exported  # what it was trained with
    answers = block(capsys, provenance_run["outputs"]).splitlines()
    assert answers[0] == f"{provenance_run['outputs']}: generated outputs"
    assert answers[1].startswith("  answers     2 (engine transformers, batch size 1)")
    assert f"  model       {provenance_run['hf_export']}" in answers
    assert f"  exported    from {provenance_run['run']} at iteration 2" in answers
    assert block(capsys, provenance_run["outputs"] + ".meta") == "\n".join(answers) + "\n"


@pytest.fixture
def bad_paths(provenance_run, tmp_path):
    """Paths of every kind that symnoise-inspect must refuse in one line."""
    truncated = tmp_path / "truncated_run"
    shutil.copytree(provenance_run["run"], truncated)
    record = truncated / "iter_0000002" / "symnoise_provenance.json"
    record.write_text(record.read_text()[:200])
    foreign = tmp_path / "foreign_run" / "iter_0000002"
    shutil.copytree(provenance_run["run"], foreign.parent)
    (foreign / "symnoise_provenance.json").write_text(json.dumps({"format": "someone else's", "run": {}}))
    outputs = tmp_path / "outputs.json"
    shutil.copy(provenance_run["outputs"], outputs)
    (tmp_path / "outputs.json.meta").write_text('{"generator": {"model": ')
    meta = tmp_path / "prefix_meta.json"
    meta.write_text('{"samples": 3, "tokeni')
    (tmp_path / "plain.json").write_text("[1, 2]")
    (tmp_path / "empty").mkdir()
    return {
        "truncated record": (str(truncated), f"error: {record}: not valid JSON (line "),
        "foreign record": (str(foreign), f"error: {foreign / 'symnoise_provenance.json'}: not a provenance record written "
                                         "by symnoise-megatron"),
        "truncated .meta": (str(outputs), f"error: {outputs}.meta: not valid JSON ("),
        "truncated prefix meta": (str(tmp_path / "prefix"), f"error: {meta}: not valid JSON ("),
        "foreign JSON": (str(tmp_path / "plain.json"), f"error: {tmp_path / 'plain.json'} is none of these (a file without "
                                                       "plain.json.meta beside it); expected a training or converted"),
        "an HF directory of another origin": (provenance_run["hf"], f"error: {provenance_run['hf']} is a Hugging Face "
                                                                     "directory that symnoise-convert did not write"),
        "an empty folder": (str(tmp_path / "empty"), f"error: {tmp_path / 'empty'} is a folder with none of these files; expected"),
        "nothing": (str(tmp_path / "nothing"), f"error: {tmp_path / 'nothing'} does not exist; expected a training"),
    }


@pytest.mark.parametrize("case", ["truncated record", "foreign record", "truncated .meta", "truncated prefix meta",
                                  "foreign JSON", "an HF directory of another origin", "an empty folder", "nothing"])
def test_anything_else_is_one_line_and_exit_2(bad_paths, capsys, case):
    path, start = bad_paths[case]
    code, out, err = inspect(capsys, path)
    assert code == 2 and not out
    assert err.startswith(start) and err.count("\n") == 1, err


def test_the_script_in_a_checkout_runs_beside_the_standard_librarys_inspect(provenance_run):
    # tools/ comes first on sys.path when a script there runs: a tools/inspect.py would shadow the
    # standard library's inspect, which dataclasses and torch import.
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                          "inspect_path.py")
    result = subprocess.run([sys.executable, script, provenance_run["a"]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith(f"{provenance_run['a']}: preprocessed prefix"), result.stderr
