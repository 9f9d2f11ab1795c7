"""The export's chat template and generation config: transformers' apply_chat_template gives the
project's own prompts, and its generate with the exported defaults decodes as NEFTune's protocol."""

import json
import os
import shutil

import pytest

from symnoise_megatron.checkpoint.serving_files import BASE_GENERATION_CONFIG, write_serving_files
from symnoise_megatron.data import BUNDLED_TOKENIZER
from symnoise_megatron.data.templates import TEMPLATES, Example, Turn, get_template

BASE_GENERATION = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.9}


def sentencepiece_dir(directory):
    """The bundled SentencePiece tokenizer as a LLaMA release ships one, with a sampling generation config."""
    os.makedirs(directory)
    shutil.copyfile(BUNDLED_TOKENIZER, os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as handle:
        json.dump({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                   "add_bos_token": True, "add_eos_token": False}, handle)
    with open(os.path.join(directory, "generation_config.json"), "w") as handle:
        json.dump(BASE_GENERATION, handle)
    return directory


@pytest.fixture(scope="module")
def tokenizer_dirs(smollm2_hf, tmp_path_factory):
    """name -> a folder with that tokenizer's files only: SmolLM2's (tokenizer.json, ChatML special
    tokens, its own chat_template.jinja) and the bundled SentencePiece model."""
    root = tmp_path_factory.mktemp("tokenizers")
    smollm2 = root / "smollm2"
    smollm2.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json", "config.json"):
        if os.path.exists(os.path.join(smollm2_hf, name)):
            shutil.copyfile(os.path.join(smollm2_hf, name), smollm2 / name)
    return {"smollm2": str(smollm2), "sentencepiece": sentencepiece_dir(str(root / "sentencepiece"))}


def exported(tokenizer_dirs, kind, template, tmp_path):
    directory = str(tmp_path / f"{kind}-{template}")
    shutil.copytree(tokenizer_dirs[kind], directory)
    write_serving_files(directory, template)
    return directory


def project_text(template_name, turns, system=None, bos="", eos=""):
    """What the project's renderer gives up to where the last (empty) response starts, with the
    BOS and EOS tokens that training puts around the segments, as text."""
    template = get_template(template_name)
    segments = template.render(Example([Turn(user, answer) for user, answer in turns], system))
    assert segments[-1].is_response
    text = bos if template.add_bos else ""
    for segment in segments[:-1]:
        text += segment.text + (eos if segment.eos_after else "")
    return text


def chat(turns, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        if answer:
            messages.append({"role": "assistant", "content": answer})
    return messages


ONE = [("What is the capital of France?", "")]
SEVERAL = [("What is the capital of France?", "Paris."), ("And of Italy?", "Rome."), ("Name a colour.", "")]


@pytest.mark.parametrize("kind", ["smollm2", "sentencepiece"])
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_apply_chat_template_gives_the_projects_prompt(tokenizer_dirs, tmp_path, kind, template):
    from transformers import AutoTokenizer

    from symnoise_megatron.data.tokenizer import TokenizerSpec
    from symnoise_megatron.evaluation.generate import prompt_text

    directory = exported(tokenizer_dirs, kind, template, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokens = dict(bos=tokenizer.bos_token or "", eos=tokenizer.eos_token or "")
    text = tokenizer.apply_chat_template(chat(ONE), tokenize=False, add_generation_prompt=True)
    assert text == project_text(template, ONE, **tokens)
    assert text.endswith(prompt_text(template, ONE[0][0]))  # generation's own prompt
    if kind == "smollm2":  # the same tokenizer on both sides: the ids generation feeds the model
        ours = TokenizerSpec(directory=directory).load()
        ids = ours.encode([prompt_text(template, ONE[0][0])])[0]
        ids = [ours.bos_id] + ids if get_template(template).add_bos else ids
        assert tokenizer.apply_chat_template(chat(ONE), tokenize=True, add_generation_prompt=True, return_dict=False) == ids
    if get_template(template).multi_turn:
        for system in (None, "You are terse."):
            text = tokenizer.apply_chat_template(chat(SEVERAL, system), tokenize=False, add_generation_prompt=True)
            assert text == project_text(template, SEVERAL, system, **tokens)
    else:
        with pytest.raises(Exception, match="takes one user message"):
            tokenizer.apply_chat_template(chat(SEVERAL), tokenize=False, add_generation_prompt=True)


def test_the_generation_config_is_neftunes_decoding_with_the_templates_stop_ids(tokenizer_dirs, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    directory = exported(tokenizer_dirs, "sentencepiece", "alpaca", tmp_path)
    with open(os.path.join(directory, BASE_GENERATION_CONFIG)) as handle:
        assert json.load(handle) == BASE_GENERATION  # the base model's, kept as it was
    config = GenerationConfig.from_pretrained(directory)
    config.validate(strict=True)  # transformers would save it again unchanged
    assert (config.do_sample, config.top_k, config.temperature, config.top_p) == (True, 1, 1.0, 1.0)  # greedy
    assert config.repetition_penalty == 1.2 and config.max_new_tokens == 1024
    assert config.eos_token_id == [2] and config.bos_token_id == 1
    # ChatML ends a response with <|im_end|>, not EOS; SmolLM2's EOS is <|im_end|> itself.
    chatml = exported(tokenizer_dirs, "smollm2", "chatml", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(chatml)
    assert GenerationConfig.from_pretrained(chatml).eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert not os.path.exists(os.path.join(chatml, "chat_template.jinja"))  # SmolLM2's own would win over ours
