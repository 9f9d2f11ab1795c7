"""Prompt templates: how an instruction example becomes text, and which text is the response.

A template renders an :class:`Example` into :class:`Segment` pieces; the response segments
are what the loss mask covers (plus the EOS token that ends each response). Each template
also has its Jinja twin (:data:`CHAT_TEMPLATES`), the Hugging Face chat template that an
exported model carries, so that ``apply_chat_template`` and ``vllm serve`` ask a fine-tune
in the format it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class Turn:
    """One exchange: the user's message (Alpaca's ``instruction``), its optional context
    (Alpaca's ``input``) and the assistant's response."""

    user: str
    response: str
    context: str = ""

    def user_text(self) -> str:
        return f"{self.user}\n\n{self.context}" if self.context else self.user


@dataclass
class Example:
    turns: List[Turn]
    system: Optional[str] = None


@dataclass
class Segment:
    text: str
    is_response: bool = False
    eos_after: bool = False  # an EOS token follows this segment (end of a response)


@dataclass(frozen=True)
class Template:
    """Attributes:
        name: the ``--prompt-template`` value.
        add_bos: start the sample with the tokenizer's BOS token.
        multi_turn: renders more than one exchange per sample.
        special_tokens: strings the tokenizer must know as single tokens.
        stop_tokens: tokens that end a response besides the tokenizer's EOS (ChatML's
            ``<|im_end|>``, which its training responses end with instead of EOS).
    """

    name: str
    add_bos: bool = True
    multi_turn: bool = False
    special_tokens: Tuple[str, ...] = field(default=())
    stop_tokens: Tuple[str, ...] = field(default=())

    def render(self, example: Example) -> List[Segment]:
        return _RENDERERS[self.name](example)


# Stanford Alpaca's two prompts, verbatim; the response follows "### Response:" directly.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)
# FastChat's vicuna_v1.1 conversation template.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def alpaca_prompt(instruction: str, context: str = "") -> str:
    if context:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=context)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def _render_alpaca(example: Example) -> List[Segment]:
    turn = example.turns[0]
    return [Segment(alpaca_prompt(turn.user, turn.context)), Segment(turn.response, True, True)]


def _render_vicuna(example: Example) -> List[Segment]:
    segments = []
    prefix = (example.system or VICUNA_SYSTEM) + " "
    for turn in example.turns:
        segments.append(Segment(f"{prefix}USER: {turn.user_text()} ASSISTANT:"))
        segments.append(Segment(f" {turn.response}", True, True))
        prefix = ""
    return segments


def _render_chatml(example: Example) -> List[Segment]:
    segments = []
    head = f"<|im_start|>system\n{example.system}<|im_end|>\n" if example.system else ""
    for turn in example.turns:
        segments.append(Segment(f"{head}<|im_start|>user\n{turn.user_text()}<|im_end|>\n<|im_start|>assistant\n"))
        segments.append(Segment(f"{turn.response}<|im_end|>", True))
        head = "\n"
    return segments


def _render_none(example: Example) -> List[Segment]:
    turn = example.turns[0]
    return [Segment(f"{turn.user_text()}\n"), Segment(turn.response, True, True)]


_RENDERERS = {
    "alpaca": _render_alpaca,
    "vicuna_v1.1": _render_vicuna,
    "chatml": _render_chatml,
    "none": _render_none,
}

TEMPLATES = {
    "alpaca": Template("alpaca"),
    "vicuna_v1.1": Template("vicuna_v1.1", multi_turn=True),
    "chatml": Template("chatml", add_bos=False, multi_turn=True, special_tokens=("<|im_start|>", "<|im_end|>"),
                       stop_tokens=("<|im_end|>",)),
    "none": Template("none"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def stop_ids(template: Template, tokenizer) -> List[int]:
    """The token ids that end an answer in ``template``'s format: the tokenizer's EOS, then the
    template's stop tokens that the tokenizer knows as single tokens."""
    ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    for token in template.stop_tokens:
        token_id = tokenizer.token_id(token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


# The renderers above as Hugging Face chat templates (Jinja, as transformers runs it: messages
# with role and content, bos_token, eos_token, add_generation_prompt). Rendered with
# add_generation_prompt, a conversation ending in a user message is exactly the text the
# renderer gives up to where the last response starts (BOS first where the template adds it,
# EOS after each earlier response where training put one); tests/data/test_chat_templates.py
# holds each one to its renderer through transformers' own apply_chat_template.
def _jinja_string(text: str) -> str:
    return json.dumps(text)


def _bos(template_name: str) -> str:
    return ("{%- if bos_token is defined and bos_token %}{{ bos_token }}{% endif -%}"
            if TEMPLATES[template_name].add_bos else "")


_EOS = "{%- if eos_token is defined and eos_token %}{{ eos_token }}{% endif -%}"
_ALPACA_CUE = "### Response:"


def _single_turn_check(template_name: str) -> str:
    return ("{%- if messages | length == 0 or messages | length > 2 or messages[0]['role'] != 'user' or "
            "(messages | length == 2 and messages[1]['role'] != 'assistant') -%}"
            "{{- raise_exception('the " + template_name + " template takes one user message, optionally followed by "
            "its answer') -}}{%- endif -%}")


def _alpaca_chat_template() -> str:
    head, tail = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    assert tail.endswith(_ALPACA_CUE)
    return (_single_turn_check("alpaca") + _bos("alpaca")
            + "{{- " + _jinja_string(head) + " + messages[0]['content'] + " + _jinja_string(tail[:-len(_ALPACA_CUE)]) + " -}}"
            + "{%- if messages | length == 2 -%}{{- " + _jinja_string(_ALPACA_CUE) + " + messages[1]['content'] -}}" + _EOS
            + "{%- elif add_generation_prompt -%}{{- " + _jinja_string(_ALPACA_CUE) + " -}}{%- endif -%}")


def _alternation_check(template_name: str) -> str:
    return ("{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
            "{{- raise_exception('the " + template_name + " template takes user and assistant messages in turn, "
            "after an optional system message') -}}{%- endif -%}")


def _vicuna_chat_template() -> str:
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set system = " + _jinja_string(VICUNA_SYSTEM) + " -%}{%- set turns = messages -%}{%- endif -%}"
            + _bos("vicuna_v1.1") + "{{- system + ' ' -}}"
            "{%- for message in turns -%}" + _alternation_check("vicuna_v1.1")
            + "{%- if message['role'] == 'user' -%}{{- 'USER: ' + message['content'] + ' ' -}}"
            "{%- else -%}{{- 'ASSISTANT: ' + message['content'] -}}" + _EOS + "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}")


def _chatml_chat_template() -> str:
    return ("{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}{%- set turns = messages[1:] -%}"
            "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
            "{%- for message in turns -%}" + _alternation_check("chatml")
            + "{%- if message['role'] == 'user' -%}{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' -}}"
            "{%- else -%}{{- '<|im_start|>assistant\\n' + message['content'] + '<|im_end|>' -}}"
            "{%- if not loop.last -%}{{- '\\n' -}}{%- endif -%}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def _none_chat_template() -> str:
    return (_single_turn_check("none") + _bos("none") + "{{- messages[0]['content'] + '\\n' -}}"
            "{%- if messages | length == 2 -%}{{- messages[1]['content'] -}}" + _EOS + "{%- endif -%}")


CHAT_TEMPLATES = {
    "alpaca": _alpaca_chat_template(),
    "vicuna_v1.1": _vicuna_chat_template(),
    "chatml": _chatml_chat_template(),
    "none": _none_chat_template(),
}


def default_template(format_name: str) -> str:
    """DESIGN.md's choice: Vicuna v1.1 for ShareGPT, Alpaca for every other format."""
    return "vicuna_v1.1" if format_name == "sharegpt" else "alpaca"
