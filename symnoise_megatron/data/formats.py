"""Instruction data formats: one raw row -> an :class:`Example`, with row-level errors."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from symnoise_megatron.data.templates import Example, Turn


class RowError(ValueError):
    """A row that cannot become a sample; ``reason`` is a short key counted in the meta file."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _text(row: dict, key: str, required: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise RowError("missing_key", f"missing key {key!r} (row has: {', '.join(sorted(row)) or 'nothing'})")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError("not_a_string", f"field {key!r} is a {type(value).__name__}, not a string")
    return value


def _response(text: str, key: str) -> str:
    if not text.strip():
        raise RowError("empty_response", f"empty response in {key!r}")
    return text


def _instruction_format(instruction_key: str, context_key: Optional[str], response_key: str):
    def convert(row: dict, turns: str) -> Example:
        user = _text(row, instruction_key)
        if not user.strip():
            raise RowError("empty_prompt", f"empty prompt in {instruction_key!r}")
        context = _text(row, context_key, required=False) if context_key else ""
        return Example([Turn(user, _response(_text(row, response_key), response_key), context)])

    return convert


_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bing", "bard", "model"}


def _message_kind(list_key: str, index: int, message, role_key: str, text_key: str):
    """(``"system"``, ``"user"`` or ``"assistant"``, text) of one message."""
    if not isinstance(message, dict):
        raise RowError("bad_message", f"{list_key}[{index}] is not an object")
    role, text = _text(message, role_key).lower(), _text(message, text_key)
    if role == "system":
        return "system", text
    if role in _USER_ROLES:
        return "user", text
    if role in _ASSISTANT_ROLES:
        return "assistant", text
    raise RowError("unknown_role", f"{list_key}[{index}] has unknown role {role!r}")


def _conversation_format(list_key: str, role_key: str, text_key: str):
    """ShareGPT ``conversations`` (from/value) or chat ``messages`` (role/content).

    Policy, as FastChat's training code reads them: an optional leading system message
    becomes the system prompt; a leading assistant message (a greeting nobody asked for) is
    dropped; the rest must alternate user/assistant, else the row is bad (reason
    ``roles_not_alternating``): pairing around a repeated role would drop messages unseen.
    A last user message without an answer is left out. ``turns="first"`` (the paper's
    single-turn policy) keeps the first pair only; ``"all"`` keeps every pair. A
    conversation without a user message followed by an assistant message is a bad row.
    """

    def convert(row: dict, turns: str) -> Example:
        if list_key not in row:
            raise RowError("missing_key", f"missing key {list_key!r}")
        messages = row[list_key]
        if not isinstance(messages, list):
            raise RowError("not_a_list", f"{list_key!r} is a {type(messages).__name__}, not a list")
        entries = [(index, *_message_kind(list_key, index, message, role_key, text_key))
                   for index, message in enumerate(messages)]
        system = None
        if entries and entries[0][1] == "system":
            system = entries.pop(0)[2]
        if entries and entries[0][1] == "assistant":
            entries.pop(0)
        pairs = []
        for position, (index, kind, text) in enumerate(entries):
            expected = "user" if position % 2 == 0 else "assistant"
            if kind != expected:
                raise RowError("roles_not_alternating",
                               f"{list_key}[{index}] is from the {kind} where the {expected} should speak; "
                               "roles must alternate user/assistant after an optional system message")
            if kind == "assistant":
                pairs.append(Turn(entries[position - 1][2], text))
                if turns == "first":  # what follows the first exchange is not used: not judged either
                    break
        if not pairs:
            raise RowError("no_exchange", f"{list_key!r} has no user message followed by an assistant message")
        for turn in pairs:
            _response(turn.response, list_key)
        return Example(pairs, system)

    return convert


def _self_instruct(row: dict, turns: str) -> Example:
    """Self-Instruct seed tasks: ``instruction`` and one ``instances`` entry (input/output)."""
    user = _text(row, "instruction")
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RowError("missing_key", "missing or empty 'instances' list")
    if len(instances) > 1:
        raise RowError("multiple_instances", f"{len(instances)} instances; one sample per row is supported")
    instance = instances[0]
    if not isinstance(instance, dict):
        raise RowError("bad_message", "instances[0] is not an object")
    return Example([Turn(user, _response(_text(instance, "output"), "output"), _text(instance, "input", required=False))])


Converter = Callable[[dict, str], Example]

FORMATS: Dict[str, Converter] = {
    # Stanford Alpaca: instruction / input / output.
    "alpaca": _instruction_format("instruction", "input", "output"),
    # WizardLM evol_instruct_70k: instruction / output.
    "evol_instruct": _instruction_format("instruction", None, "output"),
    # garage-bAInd/Open-Platypus: instruction / input / output (/ data_source).
    "open_platypus": _instruction_format("instruction", "input", "output"),
    # ShareGPT / Vicuna: conversations of {from, value}.
    "sharegpt": _conversation_format("conversations", "from", "value"),
    # Chat messages of {role, content} (Megatron-LM's SFT dataset format).
    "messages": _conversation_format("messages", "role", "content"),
    # Self-Instruct seed tasks: instruction + instances[{input, output}].
    "self_instruct": _self_instruct,
}


def generic_format(prompt_key: str, response_key: str) -> Converter:
    return _instruction_format(prompt_key, None, response_key)


def detect_format(columns: Sequence[str]) -> str:
    """The format a set of column names belongs to (``--format auto``)."""
    columns = set(columns)
    if "conversations" in columns:
        return "sharegpt"
    if "messages" in columns:
        return "messages"
    if {"instruction", "instances"} <= columns:
        return "self_instruct"
    if {"instruction", "output"} <= columns:
        # Alpaca's input is optional, so Evol-Instruct rows read the same way.
        return "open_platypus" if "data_source" in columns else "alpaca"
    raise ValueError(
        f"cannot tell the data format from the columns {sorted(columns)}; pass --format, or "
        "--prompt-key/--response-key for another layout"
    )


def get_converter(name: str, prompt_key: Optional[str] = None, response_key: Optional[str] = None) -> Converter:
    if prompt_key or response_key:
        if not (prompt_key and response_key):
            raise ValueError("--prompt-key and --response-key go together")
        return generic_format(prompt_key, response_key)
    if name not in FORMATS:
        raise ValueError(f"unknown data format {name!r}; known: auto, {', '.join(FORMATS)}")
    return FORMATS[name]


def format_names() -> List[str]:
    return list(FORMATS)
