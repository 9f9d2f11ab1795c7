"""Prompt templates: how an instruction example becomes text, and which text is the response.

A template renders an :class:`Example` into :class:`Segment` pieces; the response segments
are what the loss mask covers (plus the EOS token that ends each response).
"""

from __future__ import annotations

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
    """

    name: str
    add_bos: bool = True
    multi_turn: bool = False
    special_tokens: Tuple[str, ...] = field(default=())

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
    "chatml": Template("chatml", add_bos=False, multi_turn=True, special_tokens=("<|im_start|>", "<|im_end|>")),
    "none": Template("none"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown prompt template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def default_template(format_name: str) -> str:
    """DESIGN.md's choice: Vicuna v1.1 for ShareGPT, Alpaca for every other format."""
    return "vicuna_v1.1" if format_name == "sharegpt" else "alpaca"
