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
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(chatml).eos_token_id == [im_end]
    assert not os.path.exists(os.path.join(chatml, "chat_template.jinja"))  # SmolLM2's own would win over ours
    # A tokenizer whose EOS is another token stops at both.
    other_eos = str(tmp_path / "other_eos")
    shutil.copytree(tokenizer_dirs["smollm2"], other_eos)
    with open(os.path.join(other_eos, "tokenizer_config.json")) as handle:
        config = json.load(handle)
    with open(os.path.join(other_eos, "tokenizer_config.json"), "w") as handle:
        json.dump(dict(config, eos_token="<|endoftext|>"), handle)
    write_serving_files(other_eos, "chatml")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert endoftext != im_end and GenerationConfig.from_pretrained(other_eos).eos_token_id == [endoftext, im_end]


def convert_and_export(hf_dir, megatron_dir, exports):
    import contextlib
    import io

    from symnoise_megatron.checkpoint import paths
    from symnoise_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
    from symnoise_megatron.commands.convert import main as convert_command

    hf_to_megatron(hf_dir, megatron_dir, progress=False)
    info = paths.read_info(megatron_dir)
    paths.write_info(megatron_dir, dict(info, prompt_template="alpaca"))  # as a fine-tune on Alpaca data records it
    megatron_to_hf(megatron_dir, exports["recorded"], progress=False)
    megatron_to_hf(megatron_dir, exports["asked"], progress=False, prompt_template="vicuna_v1.1")
    shutil.rmtree(os.path.join(megatron_dir, paths.HF_ASSETS))
    note = io.StringIO()
    with contextlib.redirect_stderr(note):  # the recorded template is left out, and the command says so
        assert convert_command(["megatron-to-hf", "--load-dir", megatron_dir, "--save-dir", exports["no tokenizer"],
                                "--no-progress"]) == 0
    with contextlib.redirect_stderr(io.StringIO()) as error:
        assert convert_command(["megatron-to-hf", "--load-dir", megatron_dir, "--save-dir", exports["no tokenizer, asked"],
                                "--prompt-template", "alpaca"]) == 2
    return note.getvalue(), error.getvalue()


@pytest.mark.distributed
def test_megatron_to_hf_exports_the_recorded_template_and_decodes_as_neftune(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from symnoise_megatron.evaluation.generate import Decoding, Generator
    from tests.distributed import run_distributed
    from tools.make_tiny_llama import main as make_tiny

    make_tiny(["--save-dir", str(tmp_path / "hf"), "--hidden-size", "64", "--num-layers", "2"])
    exports = {name: str(tmp_path / name.replace(" ", "_").replace(",", ""))
               for name in ("recorded", "asked", "no tokenizer", "no tokenizer, asked")}
    [(note, refusal)] = run_distributed(convert_and_export, 1, str(tmp_path / "hf"), str(tmp_path / "mg"), exports)
    [note] = [line for line in note.splitlines() if line.startswith("note:")]  # (megatron-core's warnings beside it)
    [refusal] = [line for line in refusal.splitlines() if line.startswith("error:")]
    assert note.startswith(f"note: {tmp_path / 'mg'} keeps no tokenizer") and "alpaca chat template" in note
    assert refusal.startswith(f"error: {tmp_path / 'mg'} keeps no tokenizer")
    assert not os.path.exists(exports["no tokenizer, asked"])
    assert "model.safetensors" in os.listdir(exports["no tokenizer"])
    assert not os.path.exists(os.path.join(exports["no tokenizer"], BASE_GENERATION_CONFIG))
    for name, template in (("recorded", "alpaca"), ("asked", "vicuna_v1.1")):
        tokenizer = AutoTokenizer.from_pretrained(exports[name])
        text = tokenizer.apply_chat_template(chat(ONE), tokenize=False, add_generation_prompt=True)
        assert text == project_text(template, ONE, bos=tokenizer.bos_token)
    with open(tmp_path / "hf" / "generation_config.json") as original, open(os.path.join(exports["recorded"], BASE_GENERATION_CONFIG)) as kept:
        assert json.load(kept) == json.load(original)
    # transformers' generate with the exported defaults answers as symnoise-generate with NEFTune's settings.
    model = AutoModelForCausalLM.from_pretrained(exports["recorded"], dtype=torch.float32)
    generator = Generator(exports["recorded"])
    prompts = [generator.prompt_ids(q) for q in ("What is the capital of France?", "Name a colour.")]
    expected = generator.answer_ids(prompts, Decoding(max_new_tokens=12, repetition_penalty=1.2))
    for ids, answer in zip(prompts, expected):
        with torch.no_grad():
            output = model.generate(torch.tensor([ids]), max_new_tokens=12)[0, len(ids):].tolist()
        assert generator.until_stop(output) == answer
    plain = generator.answer_ids(prompts, Decoding(max_new_tokens=12))
    assert plain != expected  # the penalty is in the defaults: without it, other answers
