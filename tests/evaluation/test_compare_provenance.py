"""symnoise-compare reads each run's provenance (from the checkpoints its log names, or the model
its answers name) to label it, and refuses runs of different models or data in one table."""

import json
import os
import shutil

import pytest

from tools.compare_runs import main

pytestmark = pytest.mark.distributed  # the run it reads is trained on spawned ranks


def copy_run(provenance_run, tmp_path, name, change=None):
    """A copy of the run's folder and log (the log naming the copy), its record changed by ``change``."""
    run = str(tmp_path / name)
    shutil.copytree(provenance_run["run"], run)
    if change:
        for iteration in ("iter_0000001", "iter_0000002"):
            path = os.path.join(run, iteration, "symnoise_provenance.json")
            with open(path) as handle:
                record = json.load(handle)
            change(record)
            with open(path, "w") as handle:
                json.dump(record, handle)
    log = tmp_path / f"{name}.log"
    with open(provenance_run["log"]) as handle:
        log.write_text(handle.read().replace(provenance_run["run"], run))
    return str(log)


def other_data(record):
    record["run"]["data"]["train"][1]["digest"] = "sha256:" + "0" * 64


def other_model(record):
    record["run"]["model"]["num_layers"] = 4


def test_runs_are_labelled_from_their_provenance(provenance_run, tmp_path, capsys):
    seed = copy_run(provenance_run, tmp_path, "seed2")
    no_saves = tmp_path / "nosave.log"  # a log without saves: found through the answers' model
    no_saves.write_text("".join(line + "\n" for line in provenance_run["lines"] if "saved checkpoint" not in line))
    unknown = tmp_path / "unknown.log"
    unknown.write_text(no_saves.read_text())
    assert main(["--run", f"sym={provenance_run['log']}", "--run", f"sym={seed}",
                 "--run", f"answers={no_saves}:{provenance_run['outputs']}", "--run", f"old={unknown}",
                 "--output-dir", str(tmp_path / "out"), "--words", "6"]) == 0
    out = capsys.readouterr().out
    assert "note: the provenance of run old is unknown; it is not checked against the others" in out
    table = (tmp_path / "out" / "table.md").read_text()
    label = ("noise symmetric, alpha 5.0, seed 1234, concat pairing; llama 2 layers, hidden 64; data 0.7 a + 0.3 b; "
             "seed 1234; iteration 2")
    assert f"| sym | {label} | {provenance_run['run']}/iter_0000002 |" in table
    assert f"| sym | {label} | {tmp_path / 'seed2'}/iter_0000002 |" in table
    assert f"| answers | {label} | {provenance_run['hf_export']} |" in table
    assert f"| old | unknown | {unknown} names no checkpoint with a provenance record |" in table


@pytest.mark.parametrize("change, what", [(other_data, "data"), (other_model, "model")])
def test_runs_of_other_data_or_models_are_refused_unless_allowed(provenance_run, tmp_path, capsys, change, what):
    other = copy_run(provenance_run, tmp_path, "other", change)
    argv = ["--run", f"sym={provenance_run['log']}", "--run", f"other={other}", "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run other trained another {what} ") and err.count("\n") == 1
    assert err.rstrip().endswith("(pass --allow-mixed to put them together anyway)")
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--allow-mixed"]) == 0
    assert f"WARNING: run other trained another {what} " in capsys.readouterr().out
    assert "| other | " in (tmp_path / "out" / "table.md").read_text()
