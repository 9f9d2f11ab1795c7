"""Prompt templates against the tokenizer's own chat template (transformers as the oracle)."""

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
