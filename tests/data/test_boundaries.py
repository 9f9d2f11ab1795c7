"""One encoding per sample: boundaries from piece spans give the two-pass rule's files, byte for byte."""

import json

import pytest

from symnoise_megatron.data import BUNDLED_INSTRUCTIONS
from symnoise_megatron.data.formats import FORMATS
from symnoise_megatron.data.preprocess import output_paths, tokenize_examples
from symnoise_megatron.data.templates import Example, Turn, get_template
from symnoise_megatron.data.tokenizer import TokenizerSpec

# Rows where a piece may cross the prompt/response cut, or a tokenizer's view of the
# prompt's end depends on what follows it.
AWKWARD = [
    {"instruction": "Ends with spaces  ", "input": "", "output": "  starts with spaces"},
    {"instruction": "Ends with a newline\n", "input": "", "output": "\nstarts with one"},
    {"instruction": "Two newlines\n\n", "input": "ctx  ", "output": "Hello"},
    {"instruction": "Tab\t", "input": "", "output": "\tindented answer\t"},
    {"instruction": "Caf", "input": "", "output": "\u00e9 (a word cut before its accent)"},
    {"instruction": "Combining e", "input": "", "output": "\u0301 accent alone"},
    {"instruction": "Emoji \U0001F600", "input": "", "output": "\U0001F600\U0001F601 twice"},
    {"instruction": "CJK \u6f22\u5b57", "input": "\u304b\u306a", "output": "\u6f22\u5b57\u3067\u3059\u3002"},
    {"instruction": "Digits 12", "input": "", "output": "34 and 5678"},
    {"instruction": "Punctuation:", "input": "", "output": ":-) and --> arrows"},
    {"instruction": "ASSISTANT", "input": "", "output": ":"},
    {"instruction": "x", "input": "", "output": "x"},
]
CONVERSATIONS = [{"conversations": [
    {"from": "human", "value": "First question  "}, {"from": "gpt", "value": " first answer\n"},
    {"from": "human", "value": "\nSecond"}, {"from": "gpt", "value": "second answer "},
]}]


def read_all(prefix):
    out = {}
    for key in ("tokens", "loss_mask"):
        for suffix in (".bin", ".idx"):
            with open(output_paths(prefix)[key] + suffix, "rb") as handle:
                out[key + suffix] = handle.read()
    return out


def chunks_the_spans_cannot_settle(examples, template, tokenizer):
    """How many chunks of ``examples`` need the two-pass rule, found without the span rule.

    A chunk needs it where a merge crosses a cut (the text before the cut, encoded alone, is
    not where the whole chunk's encoding starts), and the span rule leaves it to it where a
    segment is empty or a cut has whitespace on both sides or two whitespace characters
    before it (pre-tokenizers split a whitespace run by what follows it)."""
    from symnoise_megatron.data.preprocess import render_chunks

    count = 0
    for example in examples:
        for chunk in render_chunks(template, example):
            full = "".join(segment.text for segment in chunk)
            cuts = [len("".join(segment.text for segment in chunk[:i + 1])) for i in range(len(chunk) - 1)]
            *parts, whole = tokenizer.encode([full[:cut] for cut in cuts] + [full])
            merged = any(whole[:len(part)] != part for part in parts)
            empty = any(not segment.text for segment in chunk)
            whitespace = any(full[cut - 1].isspace() and (full[cut - 2:cut - 1].isspace() or full[cut:cut + 1].isspace())
                             for cut in cuts)
            count += merged or empty or whitespace
    return count


def test_a_template_whose_tokens_the_tokenizer_lacks_is_refused(run_preprocess, write_rows):
    # ChatML with the bundled SentencePiece model: <|im_start|> would be split into pieces.
    with pytest.raises(ValueError, match=r"--prompt-template chatml needs '<\|im_start\|>' as one token, and the "
                                         r"tokenizer at .*tokenizer.model has no such token"):
        run_preprocess([write_rows("chat.jsonl", CONVERSATIONS)], prompt_template="chatml", turns="all")


@pytest.mark.parametrize("which, template", [(which, template) for which in ("sp", "hf", "smollm2")
                                             for template in ("alpaca", "none", "vicuna_v1.1", "chatml")
                                             if (which, template) != ("sp", "chatml")])  # refused: see above
def test_span_rule_writes_the_two_pass_files(which, template, run_preprocess, write_rows, sp_tokenizer, request):
    if which == "sp":
        spec = sp_tokenizer
    else:  # a byte-level BPE trained here, and SmolLM2's real tokenizer.json
        spec = TokenizerSpec(directory=request.getfixturevalue("hf_tokenizer_dir" if which == "hf" else "smollm2_hf"))
    with open(BUNDLED_INSTRUCTIONS, encoding="utf-8") as handle:
        rows = json.load(handle) + AWKWARD
    inputs = [write_rows("rows.jsonl", rows)]
    if template in ("vicuna_v1.1", "chatml"):
        inputs.append(write_rows("chat.jsonl", CONVERSATIONS))
    common = dict(tokenizer=spec, prompt_template=template, turns="all" if template in ("vicuna_v1.1", "chatml") else "first")
    metas = {}
    for rule in ("spans", "two-pass"):
        metas[rule], prefix = run_preprocess(inputs, prefix=rule, boundary_rule=rule, **common)
        metas[rule + "_files"] = read_all(prefix)
    assert metas["spans_files"] == metas["two-pass_files"]
    # Most chunks from spans; by the two-pass rule exactly those the spans cannot settle
    # (with the bundled model and the Alpaca or Vicuna prompts: none).
    assert metas["two-pass"]["boundaries"]["spans"] == 0
    assert metas["spans"]["boundaries"]["spans"] > 300
    examples = [FORMATS["alpaca"](row, "first") for row in rows]
    if len(inputs) > 1:
        examples += [FORMATS["sharegpt"](row, "all") for row in CONVERSATIONS]
    assert metas["spans"]["boundaries"]["two_pass"] == chunks_the_spans_cannot_settle(
        examples, get_template(template), spec.load())


def test_a_cut_inside_a_whitespace_run_takes_the_two_pass_rule(tmp_path):
    """GPT-2's pre-tokenizer splits "\\n\\n" before a word into two pieces that the prompt
    alone encodes as one: the spans would put both in the prompt, the two-pass rule puts
    them in the response. The span rule must defer to it, and does."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["\u010a\u010a"] = len(vocab)  # "\n\n" as one piece
    rust = Tokenizer(models.BPE(vocab, [("\u010a", "\u010a")]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.save(str(tmp_path / "tokenizer.json"))
    tokenizer = TokenizerSpec(directory=str(tmp_path)).load()
    prompt_alone, joint = tokenizer.encode(["Say it\n\n", "Say it\n\nHello"])
    assert joint[:len(prompt_alone)] != prompt_alone  # the case guarded here

    example = Example([Turn("Say it\n", "Hello")])  # "none" renders "Say it\n\n" + "Hello"
    stats = Counter()
    spans = tokenize_examples([example], get_template("none"), tokenizer, "spans", stats)
    assert spans == tokenize_examples([example], get_template("none"), tokenizer, "two-pass")
    assert stats == {"two-pass": 1, "spans": 0}
    tokens, mask = spans[0]
    assert tokenizer.decode([t for t, m in zip(tokens, mask) if m]) == "\n\nHello"
