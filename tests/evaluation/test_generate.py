"""Generation: megatron checkpoint and its HF twin agree, resuming appends, no noise ever."""

import json
import os

import pytest
import torch

from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

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
    # The generator's identity is kept beside the answers: the megatron directory and its iteration.
    meta = json.load(open(tmp_path / "mg.json.meta"))["generator"]
    assert meta["model"] == megatron_dir and meta["checkpoint_iteration"] == "release"
    assert meta["max_new_tokens"] == 12 and meta["decoding"] == "greedy" and meta["repetition_penalty"] == 1.0


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
        generate_file(generator, str(tmp_path / "other.json"), output, "m", max_new_tokens=8, progress=False)


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


MORE_PROMPTS = PROMPTS + [{"instruction": "Write a long and detailed story about a dragon who learns to fly over the sea."},
                          {"instruction": "Why?"}]


def test_batched_greedy_answers_equal_batch_one_and_come_back_in_prompt_order(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    hf_dir, _, _ = checkpoints
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(MORE_PROMPTS))
    generator = Generator(hf_dir)
    lengths = [len(generator.prompt_ids(p["instruction"], p.get("input", ""))) for p in MORE_PROMPTS]
    assert sorted(range(5), key=lengths.__getitem__) != list(range(5))  # the batches do reorder the prompts
    settings = dict(max_new_tokens=10, repetition_penalty=1.2, progress=False)
    one = generate_file(generator, str(prompts), str(tmp_path / "b1.json"), "m", batch_size=1, **settings)
    batched = generate_file(generator, str(prompts), str(tmp_path / "b3.json"), "m", batch_size=3, **settings)
    assert [r["instruction"] for r in batched] == [p["instruction"] for p in MORE_PROMPTS]
    assert batched == one and all(r["output"] for r in one)
    # The penalty is part of the answers: without it, they differ.
    plain = generate_file(generator, str(prompts), str(tmp_path / "plain.json"), "m", batch_size=3, max_new_tokens=10,
                          progress=False)
    assert [r["output"] for r in plain] != [r["output"] for r in one]


EOS_PROMPTS = [p["instruction"] for p in MORE_PROMPTS] + [
    "List three fruits.", "Translate hello to French.", "Explain gravity in one sentence."]


@pytest.fixture(scope="module")
def early_eos_model(tmp_path_factory):
    """A tiny LLaMA that ends its answers early: the EOS row of its output layer is 1.05 times the
    row of a token its greedy answers (penalty 1.2) take a few steps in, so EOS wins there by a
    margin that a 1.2 penalty on EOS would undo."""
    from collections import Counter

    from transformers import AutoModelForCausalLM

    from symnoise_megatron.evaluation.generate import Decoding, Generator
    from tools.make_tiny_llama import main as make_tiny

    directory = str(tmp_path_factory.mktemp("early_eos") / "hf")
    make_tiny(["--save-dir", directory, "--hidden-size", "64", "--num-layers", "2"])
    generator = Generator(directory)
    answers = generator.answer_ids([generator.prompt_ids(q) for q in EOS_PROMPTS], Decoding(16, repetition_penalty=1.2))
    first = {answer[0] for answer in answers}
    later = Counter(token for answer in answers for token in set(answer[2:8]) if token not in first)
    token = later.most_common(1)[0][0]
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[generator.tokenizer.eos_id] = 1.05 * model.lm_head.weight[token]
    model.save_pretrained(directory)
    return directory


def test_padded_rows_stop_where_batch_one_stops_under_the_repetition_penalty(early_eos_model):
    from symnoise_megatron.evaluation.generate import Decoding, Generator

    generator = Generator(early_eos_model)
    prompts = [generator.prompt_ids(q) for q in EOS_PROMPTS]
    decoding = Decoding(16, repetition_penalty=1.2)
    one = generator.answer_ids(prompts, decoding, batch_size=1)
    stopped = [i for i, answer in enumerate(one) if len(answer) < 16]
    assert len(stopped) >= 3 and any(len(answer) == 16 for answer in one)  # EOS early, and not everywhere
    for batch_size in (3, len(prompts)):
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
        padded = {i for batch in batches for i in batch if len(prompts[i]) < max(len(prompts[j]) for j in batch)}
        assert padded & set(stopped)  # rows whose prompts were padded with EOS do stop early
        assert generator.answer_ids(prompts, decoding, batch_size=batch_size) == one


def test_an_interrupted_batched_run_keeps_a_prefix_and_resumes(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(MORE_PROMPTS))
    generator = Generator(checkpoints[0])
    full = generate_file(generator, str(prompts), str(tmp_path / "full.json"), "m", 8, batch_size=2, progress=False)
    original, calls = generator.answer, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    generator.answer = failing
    output = tmp_path / "out.json"
    with pytest.raises(KeyboardInterrupt):
        generate_file(generator, str(prompts), str(output), "m", 8, batch_size=2, progress=False)
    # Batches of the shortest prompts first ("Why?" is the last prompt and the shortest): two
    # batches were answered, and what is on disk is their longest prefix in prompt order,
    # nothing after the first unanswered prompt.
    lengths = [len(generator.prompt_ids(p["instruction"], p.get("input", ""))) for p in MORE_PROMPTS]
    answered = set(sorted(range(len(MORE_PROMPTS)), key=lengths.__getitem__)[:4])
    prefix = next(i for i in range(len(MORE_PROMPTS)) if i not in answered)
    assert prefix > 0 and max(answered) > prefix  # a prefix to keep, and answers beyond the gap to leave out
    assert json.loads(output.read_text()) == full[:prefix]
    generator.answer = original
    assert generate_file(generator, str(prompts), str(output), "m", 8, batch_size=2, progress=False) == full


def test_the_output_folder_is_made(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(MORE_PROMPTS[:1]))
    output = tmp_path / "outputs" / "run" / "x.json"  # as the docs name it: outputs/x.json, in a new folder
    rows = generate_file(Generator(checkpoints[0]), str(prompts), str(output), "m", 2, progress=False)
    assert json.loads(output.read_text()) == rows and len(rows) == 1 and (tmp_path / "outputs" / "run" / "x.json.meta").is_file()


@pytest.mark.parametrize("change, field", [
    (dict(max_new_tokens=5), "max_new_tokens"),
    (dict(repetition_penalty=1.2), "repetition_penalty"),
    (dict(temperature=0.7), "decoding"),
    (dict(template="chatml"), "template"),
    (dict(source={"model": "/elsewhere/model"}), "model"),
])
def test_resuming_with_another_generator_is_refused_naming_the_field(checkpoints, tmp_path, change, field):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    hf_dir, _, prompts = checkpoints
    output = str(tmp_path / "out.json")
    generate_file(Generator(hf_dir), prompts, output, "m", max_new_tokens=8, limit=1, progress=False)
    change = dict(change)
    generator = Generator(hf_dir, change.pop("template", "alpaca"), source=change.pop("source", None))
    settings = {"max_new_tokens": 8, "progress": False, **change}
    with pytest.raises(ValueError, match=f"another generator \\(.*{field}: "):
        generate_file(generator, prompts, output, "m", **settings)
    assert len(json.load(open(output))) == 1  # nothing added


def test_a_checkpoint_that_moved_on_or_an_unrecorded_file_is_refused(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import Generator, generate_file

    hf_dir, _, prompts = checkpoints
    output = str(tmp_path / "out.json")
    at = lambda iteration: Generator(hf_dir, source={"model": "/runs/x", "checkpoint_iteration": iteration})  # noqa: E731
    generate_file(at(4), prompts, output, "m", max_new_tokens=8, limit=1, progress=False)
    with pytest.raises(ValueError, match="checkpoint_iteration: 4 then, 8 now"):
        generate_file(at(8), prompts, output, "m", max_new_tokens=8, progress=False)
    assert len(generate_file(at(4), prompts, output, "m", max_new_tokens=8, progress=False)) == 3
    (tmp_path / "out.json.meta").unlink()
    with pytest.raises(ValueError, match="generator of its 3 answers is unknown"):
        generate_file(at(4), prompts, output, "m", max_new_tokens=8, progress=False)


def test_the_prompt_template_defaults_to_the_one_the_checkpoint_trained_with(checkpoints, tmp_path, capsys):
    import shutil

    from symnoise_megatron.checkpoint.paths import INFO
    from tools.generate import main

    _, converted, prompts = checkpoints
    common = ["--prompts", prompts, "--limit", "1", "--max-new-tokens", "2", "--no-progress"]
    # A converted checkpoint records no template: alpaca, and a note says so.
    assert main(["--megatron-dir", converted, "--output", str(tmp_path / "converted.json")] + common) == 0
    assert json.load(open(tmp_path / "converted.json.meta"))["generator"]["template"] == "alpaca"
    assert "no training template is recorded" in capsys.readouterr().err
    # A fine-tune's saves record its data's template (tests/training/test_trainer.py): that one is used.
    trained = tmp_path / "trained"
    shutil.copytree(converted, trained)
    info = json.loads((trained / INFO).read_text())
    (trained / INFO).write_text(json.dumps(dict(info, prompt_template="chatml")))
    assert main(["--megatron-dir", str(trained), "--output", str(tmp_path / "trained.json")] + common) == 0
    assert json.load(open(tmp_path / "trained.json.meta"))["generator"]["template"] == "chatml"
    assert "template" not in capsys.readouterr().err
    # Another template is a deliberate probe: allowed, and said.
    assert main(["--megatron-dir", str(trained), "--output", str(tmp_path / "probe.json"),
                 "--prompt-template", "alpaca"] + common) == 0
    assert f"--prompt-template alpaca, but {trained} was fine-tuned on chatml prompts" in capsys.readouterr().err


def test_bad_settings_and_outputs_are_one_line_errors(checkpoints, tmp_path, capsys):
    from tools.generate import main

    hf_dir, _, prompts = checkpoints
    common = ["--hf-dir", hf_dir, "--prompts", prompts, "--no-progress"]
    for flags, message in ((["--batch-size", "0"], "--batch-size"), (["--repetition-penalty", "0"], "--repetition-penalty"),
                           (["--top-p", "1.5"], "--top-p"), (["--engine", "vllm"], 'vllm is not installed (--engine vllm')):
        assert main(common + ["--output", str(tmp_path / "x.json")] + flags) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('[{"instruction": "What is the capital of France?", "output": "Paris"')
    assert main(common + ["--output", str(tmp_path / "broken.json")]) == 2
    err = capsys.readouterr().err
    assert "broken.json: not valid JSON (line 1" in err and err.count("\n") == 1
    assert not (tmp_path / "broken.json.meta").exists()


def test_a_checkpoint_saved_during_the_conversion_is_refused(tmp_path, monkeypatch):
    from symnoise_megatron.checkpoint import convert, paths
    from symnoise_megatron.evaluation.generate import converted_to_hf, model_source

    paths.write_tracker(str(tmp_path), 4)
    source = model_source(megatron_dir=str(tmp_path))
    assert source == {"model": str(tmp_path), "checkpoint_iteration": 4}
    monkeypatch.setattr(convert, "megatron_to_hf", lambda load, save, progress: paths.write_tracker(load, 8))
    with pytest.raises(ValueError, match="a new checkpoint was saved while it was being converted; run again"):
        with converted_to_hf(str(tmp_path), source):
            pass


def test_resuming_with_another_engine_or_its_settings_is_refused_naming_both(checkpoints, tmp_path):
    from symnoise_megatron.evaluation.generate import (Decoding, EngineSettings, Generator, answered_rows, generate_file,
                                                       generator_identity, model_source, read_prompts)

    hf_dir, _, prompts = checkpoints
    output = str(tmp_path / "out.json")
    generate_file(Generator(hf_dir), prompts, output, "m", max_new_tokens=8, limit=1, progress=False)
    recorded = json.load(open(output + ".meta"))["generator"]
    assert (recorded["engine"], recorded["dtype"]) == ("transformers", "fp32")  # auto on CPU
    with pytest.raises(ValueError, match="dtype: 'fp32' then, 'bf16' now"):
        generate_file(Generator(hf_dir, settings=EngineSettings("transformers", "bf16")), prompts, output, "m",
                      max_new_tokens=8, progress=False)
    # A node with vLLM and 8 GPUs resuming a file that transformers began (checked before any model loads).
    vllm = generator_identity(model_source(hf_dir), "alpaca", 0, Decoding(8), EngineSettings("vllm", "fp32", 8, 4096))
    with pytest.raises(ValueError, match="engine: 'transformers' then, 'vllm' now.*max_model_len: None then, 4096 now.*"
                                         "tensor_parallel_size: None then, 8 now"):
        answered_rows(output, read_prompts(prompts), prompts, vllm)
    assert len(json.load(open(output))) == 1


def test_engine_settings_belong_to_their_engine():
    from symnoise_megatron.evaluation.generate import EngineSettings

    assert EngineSettings("transformers").dtype == ("bf16" if torch.cuda.is_available() else "fp32")
    assert EngineSettings("vllm", "bf16", 8).identity() == {"engine": "vllm", "dtype": "bf16", "tensor_parallel_size": 8,
                                                            "max_model_len": None}
    for bad, message in ((dict(tensor_parallel_size=2), "--tensor-parallel-size is vLLM's"),
                         (dict(max_model_len=4096), "--max-model-len is vLLM's"), (dict(dtype="fp8"), "--dtype")):
        with pytest.raises(ValueError, match=message):
            EngineSettings("transformers", **bad)
    with pytest.raises(ValueError, match="--tensor-parallel-size must be at least 1"):
        EngineSettings("vllm", tensor_parallel_size=0)


class FakeVLLM:
    """Stands in for the vllm package: records what the adapter builds, answers with scripted token ids."""

    def __init__(self, answers):
        self.calls, self.answers = {}, answers
        fake = self

        class LLM:
            def __init__(self, **arguments):
                fake.calls["LLM"] = arguments

            def generate(self, prompts, params, use_tqdm):
                fake.calls["generate"] = prompts
                return [type("Request", (), {"outputs": [type("Out", (), {"token_ids": ids})]}) for ids in fake.answers]

        class SamplingParams:
            def __init__(self, **arguments):
                fake.calls["SamplingParams"] = arguments

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_the_vllm_adapter_builds_tensor_parallel_engine_and_sampling_arguments(checkpoints, monkeypatch):
    import sys

    from symnoise_megatron.evaluation.generate import Decoding, EngineSettings, VLLMGenerator

    hf_dir = checkpoints[0]
    fake = FakeVLLM(answers=[[5, 6, 2, 7], [8, 9]])  # 2 is the tokenizer's EOS: the first answer ends before it
    monkeypatch.setitem(sys.modules, "vllm", fake)
    generator = VLLMGenerator(hf_dir, "alpaca", seed=3, settings=EngineSettings("vllm", "bf16", 8, 4096))
    assert fake.calls["LLM"] == dict(model=hf_dir, tokenizer=hf_dir, seed=3, dtype=torch.bfloat16, tensor_parallel_size=8,
                                     max_model_len=4096, generation_config="vllm")
    answers = generator.answer(["Name a colour.", "Why?"], 64, repetition_penalty=1.2)
    assert fake.calls["SamplingParams"] == dict(max_tokens=64, temperature=0.0, top_p=1.0, repetition_penalty=1.2,
                                                seed=None, stop_token_ids=[2])
    assert fake.calls["generate"] == [{"prompt_token_ids": generator.prompt_ids(q)} for q in ("Name a colour.", "Why?")]
    assert answers == [generator.tokenizer.decode([5, 6]).strip(), generator.tokenizer.decode([8, 9]).strip()]
    generator.answer(["Why?"], 16, temperature=0.7, top_p=0.9)
    assert fake.calls["SamplingParams"] == dict(max_tokens=16, temperature=0.7, top_p=0.9, repetition_penalty=1.0,
                                                seed=3, stop_token_ids=[2])
    assert generator.identity(Decoding())["tensor_parallel_size"] == 8


def test_megatron_dir_is_converted_inside_the_export_dir_and_removed(checkpoints, tmp_path, monkeypatch, capsys):
    from symnoise_megatron.checkpoint import convert
    from tools.generate import main

    _, megatron_dir, prompts = checkpoints
    seen, original = [], convert.megatron_to_hf
    monkeypatch.setattr(convert, "megatron_to_hf", lambda load, save, **kw: seen.append(save) or original(load, save, **kw))
    exports = tmp_path / "exports"
    exports.mkdir()
    common = ["--megatron-dir", megatron_dir, "--prompts", prompts, "--limit", "1", "--max-new-tokens", "2",
              "--no-progress", "--output", str(tmp_path / "out.json")]
    assert main(common + ["--export-dir", str(exports)]) == 0
    assert os.path.dirname(seen[0]) == str(exports) and os.listdir(exports) == []
    assert main(common + ["--export-dir", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--export-dir {tmp_path / 'absent'} is not an existing folder")
    for flags, message in ((["--tensor-parallel-size", "8"], "--tensor-parallel-size is vLLM's"),
                           (["--max-model-len", "0"], "--max-model-len")):
        assert main(common + flags) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
