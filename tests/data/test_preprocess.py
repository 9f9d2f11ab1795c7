"""Preprocessing: every format and template round-trips; megatron-core reads the files back."""

import json
import os

import pytest

from symnoise_megatron.data.formats import FORMATS
from symnoise_megatron.data.preprocess import output_paths, render_chunks
from symnoise_megatron.data.templates import get_template
from symnoise_megatron.data.tokenizer import TokenizerSpec

ALPACA_ROWS = [
    {"instruction": "Name a colour of the sky.", "input": "", "output": "Blue, on a clear day."},
    {"instruction": "Add the numbers.", "input": "12, 30", "output": "The sum is 42."},
]
SHAREGPT_ROWS = [
    {"conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "What is the capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And of Italy?"},
        {"from": "gpt", "value": "Rome."},
    ]},
]
MESSAGES_ROWS = [
    {"messages": [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello there."},
        {"role": "user", "content": "Now goodbye."},
        {"role": "assistant", "content": "Goodbye."},
    ]},
]

CASES = {
    # name: (rows, file kind, format, template, turns, tokenizer)
    "alpaca_json": (ALPACA_ROWS, "json", "alpaca", "alpaca", "first", "sp"),
    "evol_instruct_jsonl": ([{"instruction": "Reverse the word.", "output": "drow"}], "jsonl", "evol_instruct", "alpaca", "first", "sp"),
    "open_platypus_parquet": ([{"instruction": "Is 7 prime?", "input": "", "output": "Yes, 7 is prime.", "data_source": "x"}], "parquet", "open_platypus", "alpaca", "first", "sp"),
    "sharegpt_first_turn": (SHAREGPT_ROWS, "jsonl", "sharegpt", "vicuna_v1.1", "first", "sp"),
    "sharegpt_all_turns": (SHAREGPT_ROWS, "jsonl", "sharegpt", "vicuna_v1.1", "all", "sp"),
    "messages_datasets_chatml": (MESSAGES_ROWS, "datasets", "messages", "chatml", "all", "hf"),
    "alpaca_vicuna_hf": (ALPACA_ROWS, "jsonl", "alpaca", "vicuna_v1.1", "first", "hf"),
    "self_instruct": ([{"instruction": "Add.", "instances": [{"input": "2, 2", "output": "4"}]}], "jsonl", "self_instruct", "none", "first", "sp"),
}


def write_input(tmp_path, rows, kind):
    if kind in ("json", "jsonl"):
        path = tmp_path / f"data.{kind}"
        text = json.dumps(rows) if kind == "json" else "".join(json.dumps(r) + "\n" for r in rows)
        path.write_text(text)
        return str(path)
    import datasets

    table = datasets.Dataset.from_list(rows)
    if kind == "parquet":
        path = str(tmp_path / "data.parquet")
        table.to_parquet(path)
        return path
    path = str(tmp_path / "saved")
    datasets.DatasetDict({"train": table}).save_to_disk(path)
    return path


def runs_of_ones(mask):
    runs, start = [], None
    for index, value in enumerate(list(mask) + [0]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index))
            start = None
    return runs


@pytest.mark.parametrize("case", CASES)
def test_round_trip_and_response_only_loss_mask(case, tmp_path, run_preprocess, hf_tokenizer_dir, sp_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    rows, kind, format_name, template_name, turns, which = CASES[case]
    spec = sp_tokenizer if which == "sp" else TokenizerSpec(directory=hf_tokenizer_dir)
    tokenizer, template = spec.load(), get_template(template_name)
    meta, prefix = run_preprocess([write_input(tmp_path, rows, kind)], tokenizer=spec,
                                  format=format_name, prompt_template=template_name, turns=turns)
    paths = output_paths(prefix)
    tokens_ds, mask_ds = IndexedDataset(paths["tokens"]), IndexedDataset(paths["loss_mask"])
    assert len(tokens_ds) == len(mask_ds) == len(rows) == meta["samples"]
    # One document per sample, as megatron-core's own builder makes them with end_document().
    assert tokens_ds.document_indices.tolist() == list(range(len(rows) + 1))

    for index, row in enumerate(rows):
        example = FORMATS[format_name](row, turns)
        tokens, mask = tokens_ds[index].tolist(), mask_ds[index].tolist()
        assert len(tokens) == len(mask)
        if template.add_bos and tokenizer.bos_id is not None:
            assert tokens[0] == tokenizer.bos_id and mask[0] == 0
            tokens, mask = tokens[1:], mask[1:]
        chunks = render_chunks(template, example)
        # The tokens are the templated text, chunk by chunk (each chunk ends with an EOS).
        position = 0
        responses = []
        for chunk in chunks:
            with_eos = chunk[-1].eos_after and tokenizer.eos_id is not None
            end = tokens.index(tokenizer.eos_id, position) if with_eos else len(tokens)
            assert tokenizer.decode(tokens[position:end]) == "".join(s.text for s in chunk)
            if with_eos:
                assert mask[end] == 1, "the EOS that ends a response is trained on"
            position = end + int(with_eos)
            responses.extend(s.text for s in chunk if s.is_response)
        assert position == len(tokens)
        # The loss mask covers exactly the responses (and their EOS).
        runs = runs_of_ones(mask)
        assert len(runs) == len(responses)
        for (start, end), response in zip(runs, responses):
            ids = [t for t in tokens[start:end] if not (t == tokenizer.eos_id and template.name != "chatml")]
            assert tokenizer.decode(ids).strip() == response.strip()
    assert meta["response_tokens"] == sum(int(m.sum()) for m in (mask_ds[i] for i in range(len(mask_ds))))


@pytest.mark.parametrize("case", CASES)
def test_format_is_detected_from_the_columns(case, tmp_path, run_preprocess, hf_tokenizer_dir, sp_tokenizer):
    rows, kind, format_name, template_name, _, which = CASES[case]
    spec = sp_tokenizer if which == "sp" else TokenizerSpec(directory=hf_tokenizer_dir)
    meta, _ = run_preprocess([write_input(tmp_path, rows, kind)], tokenizer=spec, prompt_template=template_name)
    detected = set(meta["formats"].values())
    # Evol-Instruct's columns are Alpaca's without the optional input: read the same way.
    assert detected == ({"alpaca"} if format_name == "evol_instruct" else {format_name})


def test_sharegpt_first_turn_policy_keeps_the_first_exchange(run_preprocess, write_rows):
    first, _ = run_preprocess([write_rows("a.jsonl", SHAREGPT_ROWS)], prefix="first")
    every, _ = run_preprocess([write_rows("b.jsonl", SHAREGPT_ROWS)], prefix="all", turns="all")
    assert first["prompt_template"] == "vicuna_v1.1"  # ShareGPT's default
    assert every["tokens"] > first["tokens"]


def test_workers_give_identical_files(run_preprocess, tmp_path):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    _, one = run_preprocess([BUNDLED_INSTRUCTIONS], prefix="w1", workers=1, chunk_rows=37)
    _, two = run_preprocess([BUNDLED_INSTRUCTIONS], prefix="w2", workers=2, chunk_rows=37)
    for key in ("tokens", "loss_mask"):
        for suffix in (".bin", ".idx"):
            with open(output_paths(one)[key] + suffix, "rb") as a, open(output_paths(two)[key] + suffix, "rb") as b:
                assert a.read() == b.read(), key + suffix


def test_truncation_is_counted_and_responseless_samples_dropped(run_preprocess, write_rows):
    long_prompt = {"instruction": "word " * 300, "input": "", "output": "short"}
    long_answer = {"instruction": "Say it.", "input": "", "output": "again " * 300}
    meta, prefix = run_preprocess([write_rows("t.jsonl", [long_prompt, long_answer, ALPACA_ROWS[0]])], seq_length=128)
    assert meta["samples"] == 2
    assert meta["truncated"] == 1
    assert meta["dropped"] == {"no_response_after_truncation": 1}
    assert max(int(k.split("-")[-1]) for k, v in meta["length_histogram"].items() if v) <= 128


def test_meta_records_the_run(run_preprocess, write_rows):
    meta, prefix = run_preprocess([write_rows("m.jsonl", ALPACA_ROWS)])
    with open(output_paths(prefix)["meta"]) as handle:
        assert json.load(handle) == meta
    assert meta["tokenizer"]["kind"] == "sentencepiece" and meta["tokenizer"]["bos_id"] == 1
    assert meta["prompt_template"] == "alpaca" and meta["seq_length"] == 512
    assert meta["samples_per_second"] > 0 and meta["tokens_per_second"] > 0
    assert sum(meta["length_histogram"].values()) == meta["samples"] == 2


@pytest.mark.parametrize("dtype", ["uint16", "int32", "uint8"])
def test_writer_matches_megatron_cores_builder_byte_for_byte(dtype, tmp_path):
    """The writer avoids importing megatron-core (and torch); its files must be the builder's."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from symnoise_megatron.data.preprocess import IndexedWriter

    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 250, size=n).astype(dtype) for n in (5, 1, 17, 0, 40)]
    chunk_lengths = [[2, 3], [1], [10, 7], [], [1, 1, 38]]
    ours = IndexedWriter(str(tmp_path / "ours.bin"), np.dtype(dtype))
    theirs = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.dtype(dtype).type)
    for values, lengths in zip(chunks, chunk_lengths):
        ours.add(values, np.array(lengths, np.int32))
        start = 0
        for length in lengths:
            theirs.add_item(torch.from_numpy(values[start:start + length].astype(np.int64)))
            theirs.end_document()
            start += length
    ours.finalize(str(tmp_path / "ours.idx"))
    theirs.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes(), suffix


def test_preprocessing_does_not_import_megatron_or_torch(tmp_path, write_rows):
    """Their import costs more than tokenizing 100,000 samples."""
    import subprocess
    import sys

    from symnoise_megatron.data import BUNDLED_TOKENIZER

    path = write_rows("rows.jsonl", ALPACA_ROWS)
    code = ("import sys; from tools.preprocess_data import main; "
            f"main(['--input', {path!r}, '--output-prefix', {str(tmp_path / 'p')!r}, '--tokenizer-model', {BUNDLED_TOKENIZER!r}, '--no-progress']); "
            "print(sorted(m for m in ('torch', 'megatron', 'megatron.core') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stdout.strip().splitlines()[-1] == "[]"
