#!/usr/bin/env python
"""Train the bundled SentencePiece tokenizer on the bundled instruction set.

LLaMA's own tokenizer is not available offline, so the demo and tests use a small BPE model
with LLaMA's conventions: unk 0, BOS 1, EOS 2, no pad, digits split, byte fallback. The
corpus is every instruction, input and response plus the prompt templates' text;
like LLaMA's, the model does not normalise text, so newlines survive a round trip.
Output: symnoise_megatron/data/bundled/tokenizer.model (deterministic for a given input).
"""

import argparse
import io
import json
import os

import sentencepiece

from symnoise_megatron.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, VICUNA_SYSTEM

BUNDLED = os.path.join(os.path.dirname(__file__), "..", "symnoise_megatron", "data", "bundled")


def corpus_lines(path):
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)
    lines = [ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, VICUNA_SYSTEM + " USER: ASSISTANT:"]
    for row in rows:
        lines.extend(text for text in (row["instruction"], row["input"], row["output"]) if text)
    return [text for text in lines if text.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=os.path.join(BUNDLED, "instructions.json"))
    parser.add_argument("--output", default=os.path.join(BUNDLED, "tokenizer.model"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(args.input)), model_writer=model,
        model_type="bpe", vocab_size=args.vocab_size, character_coverage=1.0,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        # As LLaMA's: no normalisation, whitespace kept, so templates keep their newlines.
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2,
    )
    with open(args.output, "wb") as handle:
        handle.write(model.getvalue())
    print(f"wrote {os.path.normpath(args.output)} ({args.vocab_size} pieces)")


if __name__ == "__main__":
    main()
