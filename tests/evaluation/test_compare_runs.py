"""Side-by-side runs: logs parsed in Megatron-LM's format, a table, two PNG plots."""

import json

from symnoise_megatron.evaluation.runs import read_log
from symnoise_megatron.training.metrics import log_line

VALIDATION = " validation loss at iteration {} | lm loss value: {:.6E} |\n"


def write_log(path, losses, validation):
    lines = [log_line(i, len(losses), 8 * i, 10.0, 1e-4, 8, loss, 1.0, 0, 100.0, None, None, 0.05) + "\n"
             for i, loss in enumerate(losses, start=1)]
    lines += [VALIDATION.format(i, v) for i, v in validation.items()]
    path.write_text("some other line\n" + "".join(lines))


def test_log_lines_written_by_the_trainer_are_read_back(tmp_path):
    write_log(tmp_path / "a.log", [3.0, 2.5, 2.0], {2: 2.7})
    run = read_log(str(tmp_path / "a.log"), "a")
    assert run.train == {1: 3.0, 2: 2.5, 3: 2.0} and run.validation == {2: 2.7}


def test_table_and_plots(tmp_path, capsys):
    from tools.compare_runs import main

    write_log(tmp_path / "none.log", [3.0, 2.0], {2: 2.4})
    write_log(tmp_path / "sym.log", [3.1, 2.1], {2: 2.2})
    (tmp_path / "sym.json").write_text(json.dumps([{"instruction": "i", "output": "a b a b a b"}]))
    assert main(["--run", f"none={tmp_path / 'none.log'}", "--run", f"symnoise={tmp_path / 'sym.log'}:{tmp_path / 'sym.json'}",
                 "--output-dir", str(tmp_path / "out"), "--words", "6"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| none | 1 | 2 | 2.4 | 2.4 | - | - |" in table
    assert table.splitlines()[0].endswith("| avg words | rep-2 % (paper) | log-diversity (paper) "
                                          "| rep-2 % (standard) | log-diversity (standard) |")
    # "a b a b a b", K = 6 (tests/evaluation/test_metrics.py works these out): paper rep-2 2/4,
    # log-diversity ln(300 / 2.495); standard rep-2 3/5, log-diversity ln(15 / 13).
    assert "| symnoise | 1 | 2.1 | 2.2 | 2.2 | -0.2 (one seed: no spread) | 6 | 50 | 4.789 | 60 | 0.1431 |" in table
    for png in ("loss.png", "responses.png"):
        with open(tmp_path / "out" / png, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["--run", "broken", "--output-dir", str(tmp_path / "x")]) == 2
    assert main(["--run", f"none={tmp_path / 'none.log'}", "--output-dir", str(tmp_path / "x"), "--words", "4"]) == 2


def test_seeds_of_a_setting_give_mean_spread_and_a_seed_noise_verdict(tmp_path):
    from symnoise_megatron.evaluation.runs import summary_table

    runs = []
    for name, finals in (("none", [2.0, 2.2, 2.4]), ("close", [2.1, 2.3, 2.5]), ("far", [1.0, 1.01, 1.02])):
        for seed, final in enumerate(finals):
            write_log(tmp_path / f"{name}{seed}.log", [3.0, 2.5], {2: final})
            runs.append(read_log(str(tmp_path / f"{name}{seed}.log"), name))
    table = summary_table(runs, words=6)
    assert "| none | 3 | 2.5 ± 0 | 2.2 ± 0.2 |" in table
    assert "| close | 3 | 2.5 ± 0 | 2.3 ± 0.2 | 2.3 ± 0.2 | +0.1 (within seed noise) |" in table
    assert "| far | 3 | 2.5 ± 0 | 1.01 ± 0.01 | 1.01 ± 0.01 | -1.19 (beyond seed noise) |" in table
