"""Tokenizers, offline: a SentencePiece ``.model`` or a Hugging Face tokenizer directory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

# Encoded by every tokenizer whose identity is recorded: two tokenizers that agree on these ids,
# the vocabulary size and the special ids tokenize instruction data alike, whatever file format
# (SentencePiece .model or tokenizer.json) carries them.
IDENTITY_PROBE = "Below is an instruction. ### Response: Ünïcödé 12345, tabs\tand  spaces!"


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a tokenizer lives; picklable, so each preprocessing worker loads its own."""

    model_file: Optional[str] = None
    directory: Optional[str] = None

    def __post_init__(self):
        if bool(self.model_file) == bool(self.directory):
            raise ValueError("give exactly one of --tokenizer-model and --tokenizer-dir")
        path = self.model_file or self.directory
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer not found: {path}")

    @property
    def path(self) -> str:
        return self.model_file or self.directory

    def load(self) -> "Tokenizer":
        if self.model_file:
            return SentencePieceTokenizer(self.model_file)
        if os.path.exists(os.path.join(self.directory, "tokenizer.json")):
            return HFTokenizer(self.directory)
        model = os.path.join(self.directory, "tokenizer.model")
        if os.path.exists(model):
            return SentencePieceTokenizer(model)
        raise FileNotFoundError(f"{self.directory} has neither tokenizer.json nor tokenizer.model")


class Tokenizer:
    """The few things the data path needs: batch encoding without special tokens, the BOS
    and EOS ids, the vocabulary size, decoding (tests, generation)."""

    kind: str
    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]

    def encode(self, texts: List[str]) -> List[List[int]]:
        raise NotImplementedError

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> Optional[int]:
        """The id of ``text`` when it is one whole token of the vocabulary, else None."""
        raise NotImplementedError

    file: str

    def identity(self) -> Dict[str, object]:
        """What the data's meta records and the trainer compares with the model's tokenizer."""
        with open(self.file, "rb") as handle:
            digest = hashlib.sha256(handle.read()).hexdigest()
        return {
            "kind": self.kind, "file": os.path.basename(self.file), "sha256": digest,
            "vocab_size": self.vocab_size, "bos_id": self.bos_id, "eos_id": self.eos_id,
            "probe_ids": self.encode([IDENTITY_PROBE])[0],
        }


def identity_differences(recorded: Dict[str, object], other: Dict[str, object]) -> List[str]:
    """The fields in which two tokenizer identities disagree, as 'field: a != b' lines.

    The file hash alone decides nothing: the same tokenizer ships as ``tokenizer.model`` and
    ``tokenizer.json``. Fields missing on either side (older meta files) are not compared."""
    differences = []
    for key in ("vocab_size", "bos_id", "eos_id", "probe_ids"):
        if key in recorded and key in other and recorded[key] != other[key]:
            differences.append(f"{key}: {recorded[key]} != {other[key]}")
    if differences and recorded.get("sha256") and recorded.get("sha256") != other.get("sha256"):
        differences.append(f"sha256 of {recorded.get('file')}: {str(recorded['sha256'])[:12]} != "
                           f"{str(other.get('sha256'))[:12]} of {other.get('file')}")
    return differences


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str):
        import sentencepiece

        self.file = model_file
        self.processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None

    def encode(self, texts):
        return self.processor.encode(texts)

    def decode(self, ids):
        return self.processor.decode(list(ids))

    def token_id(self, text):
        token = self.processor.piece_to_id(text)
        return None if token == self.processor.unk_id() else token


def _special_token(config: dict, name: str) -> Optional[str]:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as RustTokenizer

        self.file = os.path.join(directory, "tokenizer.json")
        self.tokenizer = RustTokenizer.from_file(self.file)
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    config.update(json.load(handle))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(_special_token(config, "bos_token") or "")
        self.eos_id = self.token_id(_special_token(config, "eos_token") or "")

    def encode(self, texts):
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text):
        return self.tokenizer.token_to_id(text) if text else None
