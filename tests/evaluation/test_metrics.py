"""Table 4's statistics on hand-made texts whose values are worked out by hand below."""

import json
import math

import pytest

from symnoise_megatron.evaluation.metrics import repetition, response_metrics


def test_repetition_by_hand():
    # "a b a b a b": 2-grams ab ba ab ba ab -> 5 in all, 2 distinct -> rep-2 = 1 - 2/5 = 0.6
    assert repetition("a b a b a b".split(), 2) == pytest.approx(0.6)
    # 3-grams aba bab aba bab -> 4, 2 distinct -> 0.5; 4-grams abab baba abab -> 3, 2 -> 1/3
    assert repetition("a b a b a b".split(), 3) == pytest.approx(0.5)
    assert repetition("a b a b a b".split(), 4) == pytest.approx(1 / 3)
    assert repetition("one two three four five".split(), 2) == 0.0


def test_metrics_by_hand_with_short_responses_excluded():
    texts = ["a b a b a b", "u v w x y z", "too short"]
    m = response_metrics(texts, words=6)
    assert m.responses == 3 and m.counted == 2
    # rep-2: mean(0.6, 0) = 0.3 -> 30%; rep-3: mean(0.5, 0) = 0.25; rep-4: mean(1/3, 0) = 1/6
    assert m.rep_2 == pytest.approx(30.0)
    assert m.rep_3 == pytest.approx(0.25) and m.rep_4 == pytest.approx(1 / 6)
    diversity = (1 - 0.3) * (1 - 0.25) * (1 - 1 / 6)  # 0.4375
    assert m.diversity == pytest.approx(diversity)
    assert m.log_diversity == pytest.approx(-math.log(1 - diversity))
    # Lengths count every response, whole: (11 + 11 + 9) / 3 chars, (6 + 6 + 2) / 3 words.
    assert m.avg_chars == pytest.approx(31 / 3) and m.avg_words == pytest.approx(14 / 3)


def test_only_the_k_word_prefix_counts():
    # Beyond the first 4 words this response repeats; the prefix does not.
    m = response_metrics(["w x y z z z z z z"], words=4)
    assert m.rep_2 == 0.0 and m.diversity == 1.0 and m.log_diversity == math.inf


def test_cli_json_has_the_documented_keys(tmp_path, capsys):
    from tools.text_metrics import main

    path = tmp_path / "out.json"
    path.write_text(json.dumps([{"instruction": "i", "output": "a b a b a b"}, {"instruction": "j", "output": "u v w x y z"}]))
    assert main([str(path), "--words", "6", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert list(rows[0]) == ["file", "responses", "counted", "avg_chars", "avg_words", "rep_2", "rep_3", "rep_4", "diversity", "log_diversity"]
    assert rows[0]["rep_2"] == pytest.approx(30.0)
    assert main([str(path), "--format", "markdown"]) == 0
    assert "| file | responses |" in capsys.readouterr().out
