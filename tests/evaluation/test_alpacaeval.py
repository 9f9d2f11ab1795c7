"""symnoise-evaluate alpacaeval: alpaca-eval's win rate with a local judge (SmolLM2 through
alpaca-eval's own huggingface_local_completions), checked against the annotations file; every
refusal is one line, exit 2, nothing written."""

import json
import math

import pytest

try:  # through the package's import: alpaca-eval 0.6.6 needs its pkg_resources stand-in
    from symnoise_megatron.evaluation.alpaca_eval_import import alpaca_eval

    alpaca_eval()
except ValueError as error:
    pytest.skip(str(error), allow_module_level=True)

# Short answers: the judge reads four prompts on a shared CPU.
ROWS = [("Name a primary colour.", "Red.", "Blue is a primary colour."),
        ("What is 2 + 3?", "5", "The answer is six."),
        ("Give a synonym of happy.", "Joyful.", "Sad."),
        ("Translate 'bonjour' to English.", "Hello.", "Goodbye.")]
JUDGE_PROMPT = """<|im_start|>user
Which output answers the instruction better?

Instruction: {instruction}

Output (a): {output_1}

Output (b): {output_2}

Reply with Output (a) or Output (b).<|im_end|>
<|im_start|>assistant
"""
JUDGE_CONFIG = """smollm2_judge:
  prompt_template: "{prompt}"
  fn_completions: "huggingface_local_completions"
  completions_kwargs:
    model_name: "{model}"
    max_new_tokens: 6
  completion_parser_kwargs:
    outputs_to_match:
      1: '(?:^|\\n) ?Output \\(a\\)'
      2: '(?:^|\\n) ?Output \\(b\\)'
  batch_size: 1
"""


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


@pytest.fixture
def outputs(tmp_path):
    """(model outputs, reference outputs) answering the same four instructions."""
    return (write(tmp_path / "model.json", [{"instruction": i, "output": m, "generator": "model"} for i, _, m in ROWS]),
            write(tmp_path / "reference.json", [{"instruction": i, "output": r, "generator": "reference"}
                                                for i, r, _ in ROWS]))


def judge_config(folder, model):
    folder.mkdir()
    (folder / "prompt.txt").write_text(JUDGE_PROMPT)
    (folder / "configs.yaml").write_text(JUDGE_CONFIG.format(prompt=folder / "prompt.txt", model=model))
    return str(folder)


def evaluate(model_outputs, output, *extra):
    from tools.evaluate import main

    return main(["alpacaeval", "--model-outputs", model_outputs, "--output", str(output), *extra])


def test_a_local_judge_win_rate_is_the_count_of_its_annotations_and_a_rerun_is_free(
        smollm2_hf, outputs, tmp_path, one_thread, monkeypatch):
    model_outputs, reference = outputs
    judge = judge_config(tmp_path / "smollm2_judge", smollm2_hf)
    result_path = tmp_path / "results" / "alpacaeval.json"
    assert evaluate(model_outputs, result_path, "--reference-outputs", reference, "--annotator", judge) == 0
    result = json.loads(result_path.read_text())
    annotations = json.loads(open(result["annotations"]).read())
    assert len(annotations) == len(ROWS) and {a["instruction"] for a in annotations} == {r[0] for r in ROWS}
    # The judge's greedy words, parsed by alpaca-eval: 2 when the model's answer wins, 1 when the
    # reference's does (alpaca-eval shows them in a seeded random order and turns the words back).
    preferences = [a["preference"] for a in annotations]
    judged = [p for p in preferences if p is not None and 1 <= p <= 2]
    wins, draws = sum(p == 2 for p in judged), sum(p == 1.5 for p in judged)
    assert all(a["preference_raw_completion"].lstrip().startswith("Output (") for a in annotations)
    assert result["n_total"] == len(judged) and result["unparsed"] == len(ROWS) - len(judged)
    assert result["n_wins"] == wins and result["n_draws"] == draws
    assert result["win_rate"] == pytest.approx(100 * (wins + draws / 2) / len(judged))
    p = [(x - 1) for x in judged]
    assert result["standard_error"] == pytest.approx(100 * math.sqrt(sum((v - sum(p) / len(p)) ** 2 for v in p)
                                                                      / (len(p) - 1) / len(p)))
    assert result["avg_length"] == pytest.approx(sum(len(m) for _, _, m in ROWS) / len(ROWS))
    assert result["annotator"] == "smollm2_judge" and result["generator"] == "model"
    assert result["length_controlled_win_rate"] is None and "805" in result["length_controlled_note"]

    # alpaca-eval's cache holds every judgement: a rerun never loads the judge.
    import alpaca_eval.decoders.huggingface_local as local

    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the judge was loaded again")

    monkeypatch.setattr(local, "AutoModelForCausalLM", Refuse)
    rerun = tmp_path / "results" / "again.json"
    assert evaluate(model_outputs, rerun, "--reference-outputs", reference, "--annotator", judge) == 0
    again = json.loads(rerun.read_text())
    assert {k: again[k] for k in ("win_rate", "n_wins", "n_total")} == {k: result[k] for k in ("win_rate", "n_wins",
                                                                                                "n_total")}


def refused(capsys, tmp_path, code, *fragments):
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("error: "), error
    for fragment in fragments:
        assert fragment in error[0]
    assert not (tmp_path / "out").exists()


def test_a_missing_api_key_is_refused(outputs, tmp_path, capsys, monkeypatch):
    for variable in ("OPENAI_API_KEY", "OPENAI_API_KEYS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("OPENAI_CLIENT_CONFIG_PATH", str(tmp_path / "no_client_config.yaml"))
    model_outputs, reference = outputs
    code = evaluate(model_outputs, tmp_path / "out" / "r.json", "--reference-outputs", reference, "--annotator", "chatgpt")
    refused(capsys, tmp_path, code, "--annotator chatgpt calls openai_completions", "OPENAI_API_KEY")


def test_an_annotator_that_cannot_load_is_refused(outputs, tmp_path, capsys):
    model_outputs, reference = outputs
    code = evaluate(model_outputs, tmp_path / "out" / "r.json", "--reference-outputs", reference,
                    "--annotator", "no_such_judge")
    refused(capsys, tmp_path, code, "--annotator no_such_judge: not one of alpaca-eval's evaluator configs")
    broken = tmp_path / "broken_judge"
    broken.mkdir()
    (broken / "configs.yaml").write_text(JUDGE_CONFIG.format(prompt=broken / "missing_prompt.txt", model="/nowhere"))
    code = evaluate(model_outputs, tmp_path / "out" / "r.json", "--reference-outputs", reference,
                    "--annotator", str(broken))
    refused(capsys, tmp_path, code, "--annotator broken_judge: alpaca-eval cannot load", "missing_prompt.txt")


@pytest.mark.parametrize("change, fragments", [
    ("foreign", ["row 2's instruction is not in the reference outputs", "What is 2 + 4?"]),
    ("partial", ["answers 3 of the 4 reference instructions", "--allow-partial"]),
    ("repeated", ["row 4 repeats the instruction of row 1"]),
])
def test_outputs_that_do_not_match_the_reference_are_refused(outputs, tmp_path, capsys, monkeypatch, change,
                                                              fragments):
    monkeypatch.setenv("OPENAI_API_KEY", "not-used: refused before any call")
    model_outputs, reference = outputs
    rows = json.loads(open(model_outputs).read())
    if change == "foreign":
        rows[1]["instruction"] = "What is 2 + 4?"
    elif change == "partial":
        rows = rows[:3]
    else:
        rows[3]["instruction"] = rows[0]["instruction"]
    changed = write(tmp_path / "changed.json", rows)
    code = evaluate(changed, tmp_path / "out" / "r.json", "--reference-outputs", reference, "--annotator", "chatgpt")
    refused(capsys, tmp_path, code, *fragments)


def test_the_default_reference_unreachable_is_one_line(outputs, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("OPENAI_API_KEY", "not-used")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hub_cache"))  # nothing cached there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    code = evaluate(outputs[0], tmp_path / "out" / "r.json", "--annotator", "chatgpt")
    refused(capsys, tmp_path, code, "the default reference outputs (tatsu-lab/alpaca_eval:alpaca_eval.json",
            "--reference-outputs FILE")


def test_the_length_controlled_win_rate_needs_all_805_instructions_and_says_why_not(tmp_path, monkeypatch):
    import huggingface_hub
    import pandas as pd

    from symnoise_megatron.evaluation.alpacaeval import length_controlled

    rows = [{"instruction": str(i), "output_1": "a" * (i % 7 + 1), "output_2": "b" * (i % 5 + 1),
             "generator_1": "reference", "generator_2": "model", "preference": 1.0 + i % 2} for i in range(805)]
    assert length_controlled(pd.DataFrame(rows[:4]), 4) == (
        None, None, "needs all 805 AlpacaEval instructions (its GLM uses each one's difficulty), 4 judged")
    # Over all 805, alpaca-eval's GLM reads the instructions' difficulty from the hub: offline, it says so.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    value, error, note = length_controlled(pd.DataFrame(rows), 805)
    assert value is None and error is None and note.startswith("alpaca-eval's GLM failed (")
