"""Instruction data: formats, templates, tokenizers, preprocessing, the training dataset."""

import os

BUNDLED_DIR = os.path.join(os.path.dirname(__file__), "bundled")
BUNDLED_INSTRUCTIONS = os.path.join(BUNDLED_DIR, "instructions.json")
BUNDLED_TOKENIZER = os.path.join(BUNDLED_DIR, "tokenizer.model")
