"""What an exported Hugging Face directory carries for serving, beside the weights.

- The training data's prompt template as the tokenizer's ``chat_template`` (in
  tokenizer_config.json), so that ``apply_chat_template``, ``vllm serve``'s chat requests and
  chat-based evaluation configs ask the fine-tune in the format it was trained on.
- ``generation_config.json`` with NEFTune's evaluation decoding (greedy, repetition penalty
  1.2, up to 1,024 new tokens, the template's stop ids); the base model's file, with its own
  (often sampling) defaults, is kept as ``generation_config.base.json``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.data.templates import CHAT_TEMPLATES, get_template, stop_ids
from symnoise_megatron.data.tokenizer import TokenizerSpec
from symnoise_megatron.common.files import read_json

GENERATION_CONFIG = "generation_config.json"
BASE_GENERATION_CONFIG = "generation_config.base.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers 5 saves a chat template in this file and prefers it to tokenizer_config.json's.
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# NEFTune's decoding for AlpacaEval. Greedy is written as sampling from the single most likely
# token (top_k 1): vLLM takes temperature, top_k, top_p, repetition_penalty and max_new_tokens
# from this file but not do_sample, so "do_sample: false" alone would leave `vllm serve`
# sampling at temperature 1; and transformers refuses to save a config that sets a
# temperature beside "do_sample: false". The two read this as the same greedy decoding.
NEFTUNE_DECODING: Dict[str, object] = {
    "do_sample": True, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.2, "max_new_tokens": 1024,
}
# What the base model's generation config says about its tokens, kept; its decoding is replaced.
KEPT_FROM_BASE = ("bos_token_id", "pad_token_id", "decoder_start_token_id")


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


def template_to_export(load_dir: str, requested: Optional[str] = None) -> Tuple[Optional[str], Optional[str]]:
    """The prompt template an export of checkpoint ``load_dir`` carries (``requested``, else the
    one the checkpoint records), or None and the note that says why it carries none. A
    requested template that no kept tokenizer can take is refused."""
    template = requested or paths.read_info(load_dir).get("prompt_template")
    if template is None:
        return None, (f"{load_dir} records no training prompt template: the export keeps the base model's chat template "
                      "and generation config (pass --prompt-template to export one)")
    get_template(template)
    assets = os.path.join(load_dir, paths.HF_ASSETS)
    if not any(os.path.exists(os.path.join(assets, name)) for name in ("tokenizer.json", "tokenizer.model")):
        why = (f"{load_dir} keeps no tokenizer (no tokenizer.json or tokenizer.model in {assets}), so its {template} chat "
               "template and stop tokens cannot be written")
        if requested:
            raise ValueError(f"{why}: copy the base model's tokenizer files there")
        return None, f"{why}: the export has neither (copy the base model's tokenizer files there to have them)"
    return template, None


def write_serving_files(directory: str, template_name: str) -> None:
    """Set ``directory``'s chat template and generation config for ``template_name``."""
    template = get_template(template_name)
    tokenizer = TokenizerSpec(directory=directory).load()
    config_path = os.path.join(directory, TOKENIZER_CONFIG)
    config = read_json(config_path) if os.path.exists(config_path) else {}
    config["chat_template"] = CHAT_TEMPLATES[template.name]
    _write_json(config_path, config)
    if os.path.exists(os.path.join(directory, CHAT_TEMPLATE_FILE)):  # the base model's, which would win
        os.remove(os.path.join(directory, CHAT_TEMPLATE_FILE))

    generation_path = os.path.join(directory, GENERATION_CONFIG)
    base = {}
    if os.path.exists(generation_path):
        base = read_json(generation_path)
        os.replace(generation_path, os.path.join(directory, BASE_GENERATION_CONFIG))
    generation = {key: base[key] for key in KEPT_FROM_BASE if key in base}
    if "bos_token_id" not in generation and tokenizer.bos_id is not None:
        generation["bos_token_id"] = tokenizer.bos_id
    generation.update(NEFTUNE_DECODING)
    if stop_ids(template, tokenizer):
        generation["eos_token_id"] = stop_ids(template, tokenizer)
    _write_json(generation_path, generation)
