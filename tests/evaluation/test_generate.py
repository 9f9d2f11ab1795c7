"""Generation: megatron checkpoint and its HF twin agree, resuming appends, no noise ever."""

import json

import pytest

from tests.distributed import run_distributed

PROMPTS = [{"instruction": "What is the capital of France?", "dataset": "toy"},
           {"instruction": "Add the numbers.", "input": "2, 3", "dataset": "toy"},
           {"instruction": "Name a colour.", "dataset": "toy"}]


def convert(hf_dir, megatron_dir):
    from symnoise_megatron.checkpoint.convert import hf_to_megatron

    hf_to_megatron(hf_dir, megatron_dir, progress=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tools.make_tiny_llama import main as make_tiny

    root = tmp_path_factory.mktemp("generate")
    make_tiny(["--save-dir", str(root / "hf"), "--hidden-size", "64", "--num-layers", "2"])
    run_distributed(convert, 1, str(root / "hf"), str(root / "megatron"))
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    return str(root / "hf"), str(root / "megatron"), str(prompts)


def test_megatron_checkpoint_and_hf_twin_give_the_same_greedy_answers(checkpoints, tmp_path):
    from tools.generate import main

    hf_dir, megatron_dir, prompts = checkpoints
    common = ["--prompts", prompts, "--max-new-tokens", "12", "--no-progress"]
    assert main(["--hf-dir", hf_dir, "--output", str(tmp_path / "hf.json")] + common) == 0
    assert main(["--megatron-dir", megatron_dir, "--output", str(tmp_path / "mg.json")] + common) == 0
    from_hf, from_megatron = (json.load(open(tmp_path / f)) for f in ("hf.json", "mg.json"))
    assert [r["output"] for r in from_hf] == [r["output"] for r in from_megatron]
    assert all(r["output"] for r in from_hf)
    assert list(from_hf[0]) == ["instruction", "output", "generator", "dataset"]
    assert from_hf[1]["dataset"] == "toy" and from_megatron[0]["generator"] == "megatron"


def test_resuming_skips_what_is_done_and_appends_the_rest(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    hf_dir, _, prompts = checkpoints
    output = str(tmp_path / "out.json")
    generator = Generator(hf_dir)
    first = generate_file(generator, prompts, output, "m", max_new_tokens=8, limit=1, progress=False)
    assert len(first) == 1
    calls = []
    original = generator.answer
    generator.answer = lambda *a, **k: calls.append(a[0]) or original(*a, **k)
    rows = generate_file(generator, prompts, output, "m", max_new_tokens=8, progress=False)
    assert [c[0] for c in calls] == [p["instruction"] for p in PROMPTS[1:]]
    assert [r["instruction"] for r in rows] == [p["instruction"] for p in PROMPTS] and rows[0] == first[0]
    assert json.load(open(output)) == rows
    with open(prompts) as handle:
        other = json.load(handle)
    other[0]["instruction"] = "something else"
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="does not answer"):
        generate_file(generator, str(tmp_path / "other.json"), output, "m", progress=False)


def test_generation_is_in_eval_mode_and_deterministic(checkpoints):
    from symnoise_megatron.evaluation.generate import Generator

    generator = Generator(checkpoints[0])
    assert not any(module.training for module in generator.model.modules())
    first = generator.answer(["Name a colour."], max_new_tokens=10)
    assert generator.answer(["Name a colour."], max_new_tokens=10) == first


def test_split_records_is_seeded_disjoint_and_complete(tmp_path):
    import json

    from tools.split_records import main

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(50)]
    (tmp_path / "all.json").write_text(json.dumps(rows))
    outputs = []
    for attempt in range(2):
        train, held = tmp_path / f"train{attempt}.json", tmp_path / f"held{attempt}.json"
        assert main(["--input", str(tmp_path / "all.json"), "--held-out", "10", "--seed", "3",
                     "--train-output", str(train), "--held-out-output", str(held)]) == 0
        outputs.append((json.loads(train.read_text()), json.loads(held.read_text())))
    (train, held), again = outputs[0], outputs[1]
    assert again == (train, held) and len(held) == 10 and len(train) == 40
    assert sorted(train + held, key=lambda r: int(r["instruction"][1:])) == rows
    assert train == [r for r in rows if r in train]  # input order kept
    assert main(["--input", str(tmp_path / "all.json"), "--held-out", "50", "--train-output", str(tmp_path / "t"),
                 "--held-out-output", str(tmp_path / "h")]) == 2
