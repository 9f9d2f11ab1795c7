"""Prompt templates against their references: ChatML against the tokenizer's own chat template
(transformers), Vicuna v1.1 against FastChat's conversation template; and the loss mask the
trainer reads, turn by turn."""

import pytest

from symnoise_megatron.data.templates import Example, Turn, get_template


def test_chatml_matches_smollm2s_chat_template(smollm2_hf):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf)
    system, user, answer = "You are terse.", "Name a primary colour.", "Red."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    expected_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)

    segments = get_template("chatml").render(Example([Turn(user, answer)], system=system))
    prompt = "".join(s.text for s in segments if not s.is_response)
    assert prompt == expected_prompt
    # The response ends with <|im_end|> (SmolLM2's EOS); the template's trailing newline is not trained.
    assert "".join(s.text for s in segments) + "\n" == expected_full
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_tokenizer_adds_no_bos_to_plain_text(smollm2_hf):
    from transformers import AutoTokenizer

    from symnoise_megatron.data.tokenizer import TokenizerSpec

    reference = AutoTokenizer.from_pretrained(smollm2_hf)
    ours = TokenizerSpec(directory=smollm2_hf).load()
    text = "<|im_start|>user\nHello there<|im_end|>\n"
    assert ours.encode([text])[0] == reference(text).input_ids
    assert ours.eos_id == reference.eos_token_id and ours.vocab_size == 49152


# A conversation of three exchanges: whitespace at the ends of messages, a context line, a
# system prompt. Each response must be trained exactly, and nothing of the next user turn.
SYSTEM = "You are terse."
EXCHANGES = [("Name a primary colour.", "Red."), ("And another one?  ", " Blue, or yellow.\n"),
             ("Add the numbers.\n\n2, 3", "5")]


def conversation_row(system=SYSTEM):
    messages = [{"from": "system", "value": system}] if system else []
    for user, answer in EXCHANGES:
        messages += [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return {"conversations": messages}


def trained_sample(run_preprocess, write_rows, tokenizer, template, row):
    """The (labels, loss mask) the trainer builds from the preprocessed row: the indexed files
    read back and collated into a micro-batch as training does."""
    from symnoise_megatron.data.sft_dataset import Sample, SFTIndexedData, collate

    meta, prefix = run_preprocess([write_rows("chat.jsonl", [row])], tokenizer=tokenizer, prompt_template=template,
                                  turns="all")
    assert meta["samples"] == 1
    tokens, mask = SFTIndexedData(prefix)[0]
    batch = collate([Sample(0, tokens, mask)], len(tokens) - 1)
    return tokens, batch.labels[0].tolist(), batch.loss_mask[0].tolist()


def trained_spans(labels, loss_mask):
    """The label ids of each run of loss tokens, in order."""
    runs, current = [], []
    for label, keep in zip(labels, loss_mask):
        if keep:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_chatml_multi_turn_equals_smollm2s_chat_template_and_trains_each_answer(smollm2_hf, run_preprocess, write_rows):
    from transformers import AutoTokenizer

    from symnoise_megatron.data.tokenizer import TokenizerSpec

    reference = AutoTokenizer.from_pretrained(smollm2_hf)
    messages = [{"role": "system", "content": SYSTEM}]
    for user, answer in EXCHANGES:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    text = reference.apply_chat_template(messages, tokenize=False)
    encoded = reference(text, add_special_tokens=False, return_offsets_mapping=True)
    tokens, labels, loss_mask = trained_sample(run_preprocess, write_rows, TokenizerSpec(directory=smollm2_hf), "chatml",
                                               conversation_row())
    # Token for token the template's rendering, less its final newline (after the last <|im_end|>).
    assert reference.decode(encoded.input_ids[-1:]) == "\n"
    assert tokens.tolist() == encoded.input_ids[:-1]
    # The loss covers each answer and its <|im_end|>, found in the template's text by position.
    expected_mask, cursor = [0] * len(encoded.input_ids), 0
    for _, answer in EXCHANGES:
        start = text.index(f"<|im_start|>assistant\n{answer}<|im_end|>", cursor) + len("<|im_start|>assistant\n")
        cursor = start + len(answer) + len("<|im_end|>")
        for position, (first, last) in enumerate(encoded.offset_mapping):
            if start <= first and last <= cursor and last > first:
                expected_mask[position] = 1
    # The trainer predicts token i + 1 from position i: its loss mask is the mask of the labels.
    assert loss_mask == [float(m) for m in expected_mask[1:-1]]
    assert [reference.decode(span) for span in trained_spans(labels, loss_mask)] == \
        [answer + "<|im_end|>" for _, answer in EXCHANGES]


@pytest.mark.parametrize("system", [SYSTEM, None], ids=["system", "default_system"])
def test_vicuna_v1_1_equals_fastchats_template_and_trains_each_answer(system, run_preprocess, write_rows, sp_tokenizer):
    from fastchat.conversation import get_conv_template

    from symnoise_megatron.data.templates import Example, Turn, get_template

    conversation = get_conv_template("vicuna_v1.1")
    if system:
        conversation.set_system_message(system)
    for user, answer in EXCHANGES:
        conversation.append_message(conversation.roles[0], user)
        conversation.append_message(conversation.roles[1], answer)
    segments = get_template("vicuna_v1.1").render(Example([Turn(u, a) for u, a in EXCHANGES], system=system))
    assert "".join(s.text + (conversation.sep2 if s.eos_after else "") for s in segments) == conversation.get_prompt()
    # FastChat's training code trains what follows "ASSISTANT: " up to and including each </s>.
    assert [s.text for s in segments if s.is_response] == [" " + answer for _, answer in EXCHANGES]
    assert all(s.eos_after for s in segments if s.is_response)

    tokenizer = sp_tokenizer.load()
    _, labels, loss_mask = trained_sample(run_preprocess, write_rows, sp_tokenizer, "vicuna_v1.1", conversation_row(system))
    spans = trained_spans(labels, loss_mask)
    assert [span[-1] for span in spans] == [tokenizer.eos_id] * len(EXCHANGES)
    # SentencePiece decodes a text's first "▁" to nothing: the separator's space, " " + answer.
    assert [tokenizer.decode(span[:-1]) for span in spans] == [answer for _, answer in EXCHANGES]
    # The token before each answer is the end of "ASSISTANT:", and it is not trained.
    starts = [i for i in range(1, len(loss_mask)) if loss_mask[i] and not loss_mask[i - 1]]
    assert all(tokenizer.decode(labels[:i]).endswith("ASSISTANT:") for i in starts)
