"""Fixtures of the evaluation tests: a tiny random LLaMA and a multiple-choice task in
lm-evaluation-harness's local format, written once per session."""

import json

import pytest

# Questions whose answers the models' log-likelihoods decide: the tests compute them too.
QUESTIONS = [
    ("What colour is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a dog have?", ["two", "four", "six", "eight"], 1),
    ("What is the capital of France?", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("Which animal says moo?", ["cat", "cow", "duck", "dog"], 1),
    ("What is two plus two?", ["three", "five", "four", "six"], 2),
    ("Which of these is a fruit?", ["carrot", "potato", "onion", "apple"], 3),
    ("What do bees make?", ["milk", "honey", "silk", "paper"], 1),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
]
TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="session")
def quiz_tasks(tmp_path_factory):
    """A folder for --include-path with two tasks over the same questions (``quiz``, ``quiz_again``)."""
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "quiz.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    for name in ("quiz", "quiz_again"):
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data))
    return str(folder)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    from tools.make_tiny_llama import main as make_tiny

    path = tmp_path_factory.mktemp("tiny_hf")
    make_tiny(["--save-dir", str(path), "--hidden-size", "64", "--num-layers", "2"])
    return str(path)


@pytest.fixture
def one_thread():
    """One torch thread: the CPU machine is shared, and spinning OpenMP threads of a second one
    make a 135M forward pass several times slower there, not faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
