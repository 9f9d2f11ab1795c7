"""One small run of the whole chain, shared by the provenance, inspect and compare tests:
two preprocessed prefixes, a converted tiny LLaMA, a blended fine-tune that saves at iterations
1 and 2, its Hugging Face export and answers generated from it (with their .meta).

Made once per session (tests/conftest.py imports the fixture); a test that changes a folder
copies it first.
"""

import json
import os
import shutil

import pytest

from tests.distributed import run_distributed

# The blend's weights and the run's settings; the tests that resume change one at a time.
RUN = dict(data_path=None, global_batch_size=8, micro_batch_size=2, seq_length=128, train_iters=2, save_interval=1,
           lr=2e-3, lr_warmup_fraction=0.0, log_interval=1, noise_kind="symmetric", noise_alpha=5.0, finetune=True)


def preprocess_rows(rows, prefix, **options):
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec

    with open(prefix + ".json", "w", encoding="utf-8") as handle:
        json.dump(rows, handle)
    preprocess(PreprocessConfig([prefix + ".json"], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER), seq_length=129,
                                progress=False, **options))
    return prefix


def bundled_rows():
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    with open(BUNDLED_INSTRUCTIONS, encoding="utf-8") as handle:
        return json.load(handle)


def whole_chain(root, config):
    """On one rank: convert, fine-tune (log kept), export to Hugging Face, answer two prompts."""
    from megatron.core import parallel_state

    from symnoise_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from symnoise_megatron.commands.generate import main as generate
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    hf_to_megatron(os.path.join(root, "hf"), config["load"], progress=False)
    lines = []
    Trainer(TrainingConfig.from_flags(**config), log=lines.append).run()
    parallel_state.destroy_model_parallel()
    with open(os.path.join(root, "run.log"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    megatron_to_hf(config["save"], os.path.join(root, "hf_export"), progress=False)
    with open(os.path.join(root, "prompts.json"), "w", encoding="utf-8") as handle:
        json.dump([{"instruction": "Name a colour."}, {"instruction": "Count to three."}], handle)
    assert generate(["--hf-dir", os.path.join(root, "hf_export"), "--prompts", os.path.join(root, "prompts.json"),
                     "--output", os.path.join(root, "outputs.json"), "--max-new-tokens", "3", "--engine", "transformers"]) == 0
    return lines


@pytest.fixture(scope="session")
def provenance_run(tmp_path_factory):
    """Paths of the chain's products, the run's flags and its log lines."""
    from symnoise_megatron.data import BUNDLED_TOKENIZER
    from tests.checkpoint.conftest import make_hf_model

    root = tmp_path_factory.mktemp("provenance_run")
    rows = bundled_rows()
    data = root / "data"
    data.mkdir()
    a = preprocess_rows(rows[:200], str(data / "a"))
    b = preprocess_rows(rows[200:], str(data / "b"))
    hf = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, num_hidden_layers=2,
                                     max_position_embeddings=256), str(root / "hf"))
    shutil.copy(BUNDLED_TOKENIZER, os.path.join(hf, "tokenizer.model"))  # the export can answer with it
    config = dict(RUN, data_path=["0.7", a, "0.3", b], load=str(root / "megatron"), save=str(root / "run"))
    lines = run_distributed(whole_chain, 1, str(root), config)[0]
    return {"root": str(root), "a": a, "b": b, "hf": hf, "megatron": config["load"], "run": config["save"],
            "hf_export": str(root / "hf_export"), "outputs": str(root / "outputs.json"), "log": str(root / "run.log"),
            "config": config, "lines": lines}
