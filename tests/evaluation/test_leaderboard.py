"""symnoise-evaluate leaderboard: lm-evaluation-harness on an HF checkpoint, checked against the
accuracy the test computes itself from transformers' log-likelihoods of the choices."""

import json
import math
import os
import statistics

import pytest

from tests.evaluation.conftest import QUESTIONS

pytest.importorskip("lm_eval")


def choice_loglikelihoods(hf_dir):
    """Per question, the log-likelihood of " choice" after "Question: ...\\nAnswer:" under
    transformers, the pair encoded whole with the tokenizer's defaults and split where the
    question's own encoding ends (how a causal model scores a continuation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    scores = []
    for question, choices, _ in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        context_ids = tokenizer.encode(context)
        row = []
        for choice in choices:
            ids = tokenizer.encode(context + " " + choice)
            assert ids[:len(context_ids)] == context_ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            row.append(sum(logits[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
        scores.append(row)
    return scores


def oracle(hf_dir, scores=None):
    """acc and acc_norm (log-likelihood per character of the choice), each with the standard
    error of a mean; and the smallest margin between the chosen and the next choice."""
    scores = scores or choice_loglikelihoods(hf_dir)
    results, margin = {}, math.inf
    for name, scale in (("acc", lambda choice: 1.0), ("acc_norm", lambda choice: float(len(choice)))):
        correct = []
        for (_, choices, answer), row in zip(QUESTIONS, scores):
            normalised = [ll / scale(c) for ll, c in zip(row, choices)]
            ranked = sorted(normalised, reverse=True)
            margin = min(margin, ranked[0] - ranked[1])
            correct.append(float(normalised.index(ranked[0]) == answer))
        results[name] = (statistics.fmean(correct), statistics.stdev(correct) / math.sqrt(len(correct)))
    return results, margin


def evaluate(hf_dir, tasks_dir, output, *extra):
    from tools.evaluate import main

    return main(["leaderboard", "--hf-dir", hf_dir, "--include-path", tasks_dir, "--output", str(output),
                 "--device", "cpu", *extra])


def cached_loglikelihoods(cache_file):
    """What lm-eval computed for each (question, choice), read back from its request cache."""
    from lm_eval.api.model import hash_args
    from sqlitedict import SqliteDict

    with SqliteDict(cache_file, flag="r") as cache:
        return [[cache[hash_args("loglikelihood", (f"Question: {question}\nAnswer:", " " + choice))][0]
                 for choice in choices] for question, choices, _ in QUESTIONS]


def flat(rows):
    return [value for row in rows for value in row]


def check_against_oracle(summary, expected, margin):
    assert margin > 1e-4, "the questions must not leave a near-tie for float order to decide"
    for metric, (value, stderr) in expected.items():
        measured = summary["metrics"][metric]
        assert measured["value"] == pytest.approx(value, abs=1e-12)
        assert measured["stderr"] == pytest.approx(stderr, rel=1e-9)


def test_tiny_model_accuracy_equals_transformers_and_shots_are_per_task(tiny_hf, quiz_tasks, tmp_path, one_thread):
    output = tmp_path / "board.json"
    assert evaluate(tiny_hf, quiz_tasks, output, "--tasks", "quiz,quiz_again", "--num-fewshot", "quiz_again=2",
                    "--batch-size", "4") == 0
    summary = json.loads(output.read_text())
    scores = choice_loglikelihoods(tiny_hf)
    assert flat(cached_loglikelihoods(summary["request_cache"])) == pytest.approx(flat(scores), abs=1e-4)
    expected, margin = oracle(tiny_hf, scores)
    check_against_oracle(summary["tasks"]["quiz"], expected, margin)
    # Tasks of different shot counts run in separate lm-eval calls; each records what it used.
    quiz, again = summary["tasks"]["quiz"], summary["tasks"]["quiz_again"]
    assert (quiz["num_fewshot"], again["num_fewshot"]) == (0, 2)
    assert quiz["samples"] == again["samples"] == quiz["samples_in_task"] == len(QUESTIONS)
    assert quiz["metric"] == "acc_norm" and quiz["value"] == quiz["metrics"]["acc_norm"]["value"]
    assert summary["lm_eval_version"] == "0.4.13" and summary["model"] == tiny_hf
    # lm-eval's own results beside ours, with the shots each task was really given.
    raw = json.loads(open(summary["lm_eval_results"]).read())
    assert raw["n-shot"] == {"quiz": 0, "quiz_again": 2}
    assert raw["results"]["quiz"]["acc,none"] == quiz["metrics"]["acc"]["value"]


def test_smollm2_accuracy_equals_transformers_and_a_rerun_asks_the_model_nothing(smollm2_hf, quiz_tasks, tmp_path,
                                                                                 one_thread, monkeypatch):
    output = tmp_path / "board.json"
    assert evaluate(smollm2_hf, quiz_tasks, output, "--tasks", "quiz", "--num-fewshot", "0", "--batch-size", "8") == 0
    summary = json.loads(output.read_text())
    scores = choice_loglikelihoods(smollm2_hf)
    assert flat(cached_loglikelihoods(summary["request_cache"])) == pytest.approx(flat(scores), abs=1e-4)
    expected, margin = oracle(smollm2_hf, scores)
    check_against_oracle(summary["tasks"]["quiz"], expected, margin)
    assert expected["acc"][0] >= 0.5  # a pretrained model knows most of these: the task is read as written
    assert os.path.isfile(summary["request_cache"])

    # Resumable: every request is in lm-eval's cache, so a rerun never calls the model.
    from lm_eval.models.huggingface import HFLM

    def refuse(*args, **kwargs):
        raise AssertionError("the model was asked again")

    monkeypatch.setattr(HFLM, "_model_call", refuse)
    os.remove(output)
    assert evaluate(smollm2_hf, quiz_tasks, output, "--tasks", "quiz", "--num-fewshot", "0", "--batch-size", "8") == 0
    assert json.loads(output.read_text())["tasks"] == summary["tasks"]


def test_the_default_tasks_are_the_open_llm_leaderboard_v1():
    from symnoise_megatron.evaluation.leaderboard import parse_tasks

    assert parse_tasks(None, None) == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0}
    assert parse_tasks(None, "mmlu=0") == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 0, "truthfulqa_mc2": 0}
    assert parse_tasks("arc_easy,hellaswag", "3") == {"arc_easy": 3, "hellaswag": 3}
    assert parse_tasks("arc_easy,hellaswag", None) == {"arc_easy": None, "hellaswag": 10}


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "quiz,no_such_task"], "--tasks no_such_task: lm-eval knows no such task"),
    (["--tasks", "quiz", "--num-fewshot", "mmlu=5"], "'mmlu' is not in --tasks"),
    (["--tasks", "quiz", "--num-fewshot", "two"], "'two' is not a whole number"),
    (["--tasks", "quiz", "--include-path", "/no/such/folder"], "--include-path /no/such/folder: no such folder"),
])
def test_refusals_are_one_line_and_write_nothing(tiny_hf, quiz_tasks, tmp_path, capsys, extra, message):
    output = tmp_path / "out" / "board.json"
    assert evaluate(tiny_hf, quiz_tasks, output, *extra) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_no_checkpoint_is_refused(quiz_tasks, tmp_path, capsys):
    assert evaluate(str(tmp_path), quiz_tasks, tmp_path / "board.json", "--tasks", "quiz") == 2
    assert "not a Hugging Face checkpoint (no config.json)" in capsys.readouterr().err


def test_a_hub_task_without_hub_access_is_one_line_and_leaves_nothing(tiny_hf, quiz_tasks, tmp_path, capsys,
                                                                      monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_datasets_cache")
    output = tmp_path / "out" / "board.json"
    assert evaluate(tiny_hf, quiz_tasks, output, "--tasks", "arc_challenge", "--limit", "2") == 2
    err = capsys.readouterr().err
    error = err.strip().splitlines()[-1]  # after the model's loading bar: the run had begun
    assert "Traceback" not in err and err.count("error: ") == 1
    assert error.startswith("error: --tasks arc_challenge: lm-eval could not load the data")
    assert "HF_DATASETS_OFFLINE=1" in error and not (tmp_path / "out").exists()
