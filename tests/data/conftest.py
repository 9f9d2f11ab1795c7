import json
import os

import pytest

from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
from symnoise_megatron.data.tokenizer import TokenizerSpec


@pytest.fixture
def sp_tokenizer():
    return TokenizerSpec(model_file=BUNDLED_TOKENIZER)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE tokenizer directory with ChatML's special tokens, as HF ships them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(BUNDLED_INSTRUCTIONS, encoding="utf-8") as handle:
        rows = json.load(handle)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([r["instruction"] + " " + r["input"] + " " + r["output"] for r in rows], trainer)
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer.save(str(directory / "tokenizer.json"))
    with open(directory / "tokenizer_config.json", "w") as handle:
        json.dump({"bos_token": None, "eos_token": "<|im_end|>"}, handle)
    return str(directory)


@pytest.fixture
def write_rows(tmp_path):
    def write(name, rows, kind="jsonl"):
        path = tmp_path / name
        if kind == "jsonl":
            path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
        else:
            path.write_text(json.dumps(rows))
        return str(path)

    return write


@pytest.fixture
def run_preprocess(tmp_path, sp_tokenizer):
    def run(inputs, prefix="out", **kwargs):
        kwargs.setdefault("tokenizer", sp_tokenizer)
        kwargs.setdefault("progress", False)
        config = PreprocessConfig(inputs=list(inputs), output_prefix=os.path.join(tmp_path, prefix), **kwargs)
        return preprocess(config), config.output_prefix

    return run
