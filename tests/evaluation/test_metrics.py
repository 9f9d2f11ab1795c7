"""Table 4's statistics on hand-made texts, under both definitions, with the values worked out
by hand in the comments (see symnoise_megatron/evaluation/metrics.py for the definitions)."""

import json
import math

import pytest

from symnoise_megatron.evaluation.metrics import ngram_counts, repetition, response_metrics

ABAB = "a b a b a b"
DISTINCT = "a b c d e f"


def test_ngram_count_is_off_by_one_under_paper_only():
    # 5 words: 4 bigrams (ab bc cd de); the paper's `while end < len(words)` stops at 3.
    assert ngram_counts("a b c d e".split(), 2, "standard") == (4, 4)
    assert ngram_counts("a b c d e".split(), 2, "paper") == (3, 3)
    # A repeat in the last n-gram is invisible to the paper's loop:
    # standard: ab bc cd da ab -> 4 distinct of 5 -> 0.2; paper: ab bc cd da -> 0.
    assert repetition("a b c d a b".split(), 2, "standard") == pytest.approx(0.2)
    assert repetition("a b c d a b".split(), 2, "paper") == 0.0


def test_repetition_by_hand():
    # standard: 2-grams ab ba ab ba ab -> 2 of 5 distinct -> 0.6; 3-grams aba bab aba bab -> 0.5;
    # 4-grams abab baba abab -> 1/3.
    assert [repetition(ABAB.split(), n) for n in (2, 3, 4)] == pytest.approx([0.6, 0.5, 1 / 3])
    # paper: ab ba ab ba -> 0.5; aba bab aba -> 1/3; abab baba -> 0.
    assert [repetition(ABAB.split(), n, "paper") for n in (2, 3, 4)] == pytest.approx([0.5, 1 / 3, 0.0])


def test_a_response_without_repeats_scores_the_cap():
    assert response_metrics([DISTINCT], 6, definition="paper").log_diversity == 20.0
    assert response_metrics([DISTINCT], 6, definition="standard").log_diversity == 20.0
    assert response_metrics([DISTINCT], 6, definition="standard", log_diversity_cap=30).log_diversity == pytest.approx(30.0)
    # The paper's cap is part of its code, not a setting.
    assert response_metrics([DISTINCT], 6, definition="paper", log_diversity_cap=30).log_diversity == 20.0


def test_a_response_with_repeats_by_hand():
    paper = response_metrics([ABAB], 6, definition="paper")
    # Double division: (1 - 0.5/100)(1 - (1/3)/100)(1 - 0) = 0.995 x 299/300; 1 - that = 2.495/300.
    assert paper.rep_2 == pytest.approx(50.0) and paper.rep_3 == pytest.approx(1 / 3) and paper.rep_4 == 0.0
    assert paper.diversity == pytest.approx(0.995 * 299 / 300)
    assert paper.log_diversity == pytest.approx(math.log(300 / 2.495))  # 4.789
    standard = response_metrics([ABAB], 6, definition="standard")
    # (1 - 0.6)(1 - 0.5)(1 - 1/3) = 2/15; -ln(13/15)
    assert standard.rep_2 == pytest.approx(60.0) and standard.diversity == pytest.approx(2 / 15)
    assert standard.log_diversity == pytest.approx(math.log(15 / 13))


def test_shorter_than_k_leaves_repetition_but_not_length_and_only_the_prefix_counts():
    for definition in ("paper", "standard"):
        m = response_metrics([ABAB, "too short", "w x y z v u z z z z"], 6, definition=definition)
        assert m.responses == 3 and m.counted == 2, definition
        # Lengths count every response whole: (11 + 9 + 19) / 3 chars, (6 + 2 + 10) / 3 words.
        assert m.avg_chars == pytest.approx(39 / 3) and m.avg_words == pytest.approx(18 / 3)
    # The third response's first 6 words do not repeat; its tail, which does, is not looked at.
    assert response_metrics(["w x y z v u z z z z"], 6, definition="standard").rep_2 == 0.0
    assert response_metrics(["too short"], 6).rep_2 is None and response_metrics(["too short"], 6).log_diversity is None


def test_log_diversity_is_the_mean_of_per_response_values_not_of_the_mean_repetition():
    texts = [DISTINCT, ABAB]
    paper = response_metrics(texts, 6, definition="paper")
    assert paper.log_diversity == pytest.approx((20 + math.log(300 / 2.495)) / 2)  # 12.39
    # Of the mean repetition (0.25, 1/6, 0) it would be -ln(1 - 0.9975 x 599/600) = 5.48.
    assert paper.log_diversity - 5.48 > 6
    assert paper.rep_2 == pytest.approx(25.0)
    assert paper.diversity == pytest.approx((1 + 0.995 * 299 / 300) / 2)
    standard = response_metrics(texts, 6, definition="standard")
    assert standard.log_diversity == pytest.approx((20 + math.log(15 / 13)) / 2)  # 10.07
    # The earlier aggregate, -ln(1 - (1 - 0.3)(1 - 0.25)(1 - 1/6)) = 0.575, is what this replaces.
    assert standard.log_diversity - 0.575 > 9
    assert standard.diversity == pytest.approx((1 + 2 / 15) / 2)


def write(path, rows):
    path.write_text(json.dumps(rows))
    return str(path)


def test_cli_json_keeps_the_keys_and_adds_the_definition(tmp_path, capsys):
    from tools.text_metrics import main

    path = write(tmp_path / "out.json", [{"instruction": "i", "output": ABAB}, {"instruction": "j", "output": DISTINCT}])
    assert main([path, "--words", "6", "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert list(row) == ["file", "responses", "counted", "avg_chars", "avg_words", "rep_2", "rep_3", "rep_4", "diversity",
                         "log_diversity", "definition", "log_diversity_cap"]
    assert row["definition"] == "paper" and row["rep_2"] == pytest.approx(25.0)
    assert row["log_diversity"] == pytest.approx((20 + math.log(300 / 2.495)) / 2)
    assert main([path, "--words", "6", "--format", "json", "--definition", "standard", "--log-diversity-cap", "30"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["definition"] == "standard" and row["log_diversity"] == pytest.approx((30 + math.log(15 / 13)) / 2)
    assert main([path, "--format", "markdown"]) == 0
    assert "| file | responses |" in capsys.readouterr().out


@pytest.mark.parametrize("content, args, message", [
    ([{"instruction": "i", "text": "a b"}], [], "row 1 has no 'output' key"),
    ([{"instruction": "i", "output": None}], [], "row 1 has 'output': null"),
    ([{"instruction": "i", "output": ABAB}], ["--words", "3"], "at least 4"),
    ([{"instruction": "i", "output": ABAB}], ["--words", "4"], "at least 5 under --definition paper"),
    ([{"instruction": "i", "output": ABAB}], ["--log-diversity-cap", "5"], "applies to --definition standard"),
    ([], [], "has no rows"),
    ("", [], "has no rows (it is empty)"),
    ("[{\"output\": \"a\"},", [], "not valid JSON (line 1"),
    ("{\"output\": \"a\"}\nnot json\n", [], "line 2 is not JSON"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, content, args, message):
    from tools.text_metrics import main

    good = write(tmp_path / "good.json", [{"output": ABAB}])
    bad = tmp_path / "bad.json"
    bad.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main([good, str(bad)] + args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err
