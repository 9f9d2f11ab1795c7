"""symnoise-compare --run-dir: the paper's Tables 1-4 and Figure 1 from run folders."""

import json

import pytest

from symnoise_megatron.evaluation.metrics import response_metrics

ANSWERS = {"none": ["the cat sat on the mat", "a dog ran far away today"],
           "uniform": ["the cat the cat the cat", "a dog"],
           "symmetric": ["one two three four five six seven", "the sun is warm and bright here"]}
# (gpt-4 win rate, chatgpt win rate, arc acc_norm, mmlu acc) per setting
SCORES = {"none": (50.0, 60.0, 0.50, 0.40), "uniform": (55.5, 62.0, 0.52, 0.41), "symmetric": (58.25, 64.0, 0.53, 0.405)}


def alpacaeval_result(annotator, win_rate, answers):
    return {"evaluation": "alpacaeval", "annotator": annotator, "win_rate": win_rate, "standard_error": 1.0,
            "avg_length": sum(map(len, answers)) / len(answers), "instructions": len(answers)}


def leaderboard_result(arc, mmlu):
    return {"evaluation": "leaderboard", "tasks": {
        "arc_challenge": {"metric": "acc_norm", "value": arc, "stderr": 0.01, "num_fewshot": 25, "samples": 1172},
        "mmlu": {"metric": "acc", "value": mmlu, "stderr": 0.004, "num_fewshot": 5, "samples": 14042}}}


def make_folder(root, name, kind, alpha, seed=1, scores=None):
    folder = root / name
    folder.mkdir()
    gpt4, chatgpt, arc, mmlu = scores or SCORES[kind]
    (folder / "run.json").write_text(json.dumps({"dataset": "alpaca", "model": "llama-2-7b",
                                                 "noise": {"kind": kind, "alpha": alpha, "seed": 1234}, "seed": seed}))
    (folder / "outputs.json").write_text(json.dumps([{"instruction": str(i), "output": text}
                                                     for i, text in enumerate(ANSWERS[kind])]))
    (folder / "alpacaeval_gpt4.json").write_text(json.dumps(alpacaeval_result("alpaca_eval_gpt4", gpt4, ANSWERS[kind])))
    (folder / "alpacaeval_chatgpt.json").write_text(json.dumps(alpacaeval_result("chatgpt", chatgpt, ANSWERS[kind])))
    (folder / "leaderboard.json").write_text(json.dumps(leaderboard_result(arc, mmlu)))
    # What symnoise-evaluate also leaves there and the layout must not mistake for results.
    (folder / "alpacaeval_gpt4.annotations.json").write_text(json.dumps([{"preference": 2.0}]))
    (folder / "leaderboard.lm_eval.json").write_text(json.dumps({"results": {}}))
    return str(folder)


@pytest.fixture
def folders(tmp_path):
    return [make_folder(tmp_path, "sym", "symmetric", 5), make_folder(tmp_path, "none", "none", 0),
            make_folder(tmp_path, "neftune", "uniform", 5)]


def compare(tmp_path, *folders, words="5"):
    from tools.compare_runs import main

    arguments = [a for folder in folders for a in ("--run-dir", folder)]
    return main(arguments + ["--output-dir", str(tmp_path / "paper"), "--words", words])


def section(text, title):
    start = text.index(title)
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_three_run_folders_give_the_papers_tables_and_figure(folders, tmp_path):
    assert compare(tmp_path, *folders) == 0
    paper = (tmp_path / "paper" / "paper.md").read_text()
    header = "| data set | model | none | NEFTune α=5 | SymNoise α=5 | NEFTune α=5 − none | SymNoise α=5 − none |"
    table1 = section(paper, "judged by alpaca_eval_gpt4 (Tables 1-2)")
    assert header in table1 and "| alpaca | llama-2-7b | 50.00 | 55.50 | 58.25 | +5.50 | +8.25 |" in table1
    table2 = section(paper, "judged by chatgpt (Tables 1-2)")
    assert header in table2 and "| alpaca | llama-2-7b | 60.00 | 62.00 | 64.00 | +2.00 | +4.00 |" in table2

    table3 = section(paper, "(Table 3)")
    assert ("| data set | model | setting | seeds | win rate (alpaca_eval_gpt4) | win rate (chatgpt) | avg characters |"
            in table3)
    # Settings in the papers' order (none, then the kinds as NOISE_KINDS lists them); characters of outputs.json.
    rows = [line for line in table3.splitlines() if line.startswith("| alpaca")]
    assert rows == ["| alpaca | llama-2-7b | none | 1 | 50.00 | 60.00 | 23.0 |",
                    "| alpaca | llama-2-7b | NEFTune α=5 | 1 | 55.50 | 62.00 | 14.0 |",
                    "| alpaca | llama-2-7b | SymNoise α=5 | 1 | 58.25 | 64.00 | 32.0 |"]

    table4 = section(paper, "(Table 4)")
    assert response_metrics(ANSWERS["uniform"], 5).rep_2 > 0  # a repeat for the column to show
    for kind, setting in (("none", "none"), ("uniform", "NEFTune α=5"), ("symmetric", "SymNoise α=5")):
        measured = response_metrics(ANSWERS[kind], 5)
        cells = [f"{measured.avg_chars:.1f}", f"{measured.avg_words:.1f}", f"{measured.rep_2:.2f}",
                 f"{measured.log_diversity:.2f}"]
        assert f"| alpaca | llama-2-7b | {setting} | 1 | " + " | ".join(cells) + " |" in table4

    figure = section(paper, "(Figure 1)")
    assert "| arc_challenge (acc_norm, 25-shot) | mmlu (acc, 5-shot) | average |" in figure
    assert "| alpaca | llama-2-7b | none | 1 | 50.00 | 40.00 | 45.00 |" in figure
    assert "| alpaca | llama-2-7b | SymNoise α=5 | 1 | 53.00 | 40.50 | 46.75 |" in figure
    with open(tmp_path / "paper" / "figure1.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_folders_with_the_same_labels_are_seeds(folders, tmp_path):
    second = make_folder(tmp_path, "sym_seed2", "symmetric", 5, seed=2, scores=(60.25, 64.0, 0.55, 0.405))
    assert compare(tmp_path, *folders, second) == 0
    paper = (tmp_path / "paper" / "paper.md").read_text()
    # Mean and standard deviation over the two seeds (58.25, 60.25); the gain is of the means.
    assert "| alpaca | llama-2-7b | 50.00 | 55.50 | 59.25 ± 1.41 | +5.50 | +9.25 |" in paper
    assert "| alpaca | llama-2-7b | SymNoise α=5 | 2 | 54.00 ± 1.41 | 40.50 ± 0.00 | 47.25 |" in paper


@pytest.mark.parametrize("damage, message", [
    ("no_labels", "no run.json (the run's labels"),
    ("bad_kind", "noise kind one of none, uniform, gaussian, bernoulli, symmetric"),
    ("two_judgements", "two alpacaeval results judged by chatgpt"),
])
def test_a_folder_the_layout_cannot_read_is_one_line(folders, tmp_path, capsys, damage, message):
    import os

    broken = folders[0]
    if damage == "no_labels":
        os.remove(os.path.join(broken, "run.json"))
    elif damage == "bad_kind":
        with open(os.path.join(broken, "run.json"), "w") as handle:
            json.dump({"dataset": "alpaca", "model": "m", "noise": {"kind": "loud", "alpha": 5}}, handle)
    else:
        with open(os.path.join(broken, "another.json"), "w") as handle:
            json.dump(alpacaeval_result("chatgpt", 1.0, ["x"]), handle)
    assert compare(tmp_path, *folders) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0] and broken in error[0]
    assert not (tmp_path / "paper").exists()
