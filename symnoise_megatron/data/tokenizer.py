"""Tokenizers, offline: a SentencePiece ``.model`` or a Hugging Face tokenizer directory."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from symnoise_megatron.common.files import sha256_of_file

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
            if os.path.isdir(self.model_file):
                raise ValueError(f"--tokenizer-model {self.model_file} is a directory; pass it as --tokenizer-dir")
            return SentencePieceTokenizer(self.model_file)
        if not os.path.isdir(self.directory):
            raise ValueError(f"--tokenizer-dir {self.directory} is not a directory; a SentencePiece file goes to --tokenizer-model")
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

    # Piece spans, for placing segment boundaries from one encoding of the joined text. None:
    # this tokenizer gives no spans we trust, and every boundary takes the two-pass rule.
    def encode_spans(self, texts: List[str]) -> Optional[List[Tuple[List[int], Sequence[int], Sequence[int]]]]:
        """Per text: ids, each piece's start and end, in the units of :meth:`span_length`;
        ``None`` in place of a text whose spans do not add up (it takes the two-pass rule)."""
        return None

    def span_length(self, text: str) -> int:
        return len(text)

    def decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def token_id(self, text: str) -> Optional[int]:
        """The id of ``text`` when it is one whole token of the vocabulary, else None."""
        raise NotImplementedError

    file: str

    def identity(self) -> Dict[str, object]:
        """What the data's meta records and the trainer compares with the model's tokenizer."""
        return {
            "kind": self.kind, "file": os.path.basename(self.file), "sha256": sha256_of_file(self.file),
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


def _not_a_tokenizer(path: str, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a tokenizer this tool reads ({type(error).__name__}: {str(error).strip()[:200]})")


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str, threads: int = 1):
        import sentencepiece

        self.file = model_file
        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as error:
            raise _not_a_tokenizer(model_file, error) from None
        self.threads = threads
        self.vocab_size = self.processor.vocab_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id() if self.processor.eos_id() >= 0 else None
        self._piece_bytes = self._span_table()

    def _span_table(self) -> Optional[np.ndarray]:
        """Bytes of input text each piece covers, where the model's normaliser is the identity
        (LLaMA's, the bundled one): then a piece's span is its surface, and a sample's spans
        are a running sum, with no second pass through the tokenizer. Else None."""
        try:
            from sentencepiece import sentencepiece_model_pb2  # needs protobuf
        except ImportError:
            return None  # the two-pass rule places every boundary: same files, slower

        proto = sentencepiece_model_pb2.ModelProto()
        with open(self.file, "rb") as handle:
            proto.ParseFromString(handle.read())
        normalizer = proto.normalizer_spec
        if (normalizer.name != "identity" or normalizer.precompiled_charsmap or normalizer.remove_extra_whitespaces
                or proto.trainer_spec.treat_whitespace_as_suffix or proto.denormalizer_spec.precompiled_charsmap):
            return None
        self._dummy_prefix = int(normalizer.add_dummy_prefix)
        table = np.empty(len(proto.pieces), np.int64)
        kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
        for index, piece in enumerate(proto.pieces):
            if piece.type == kinds.BYTE:
                table[index] = 1
            elif piece.type in (kinds.NORMAL, kinds.USER_DEFINED):
                table[index] = len(piece.piece.replace("\u2581", " ").encode("utf-8"))
            else:  # unknown, control: their span is not their text
                table[index] = -(1 << 40)
        return table

    def encode(self, texts):
        return self.processor.encode(texts, num_threads=self.threads)

    def encode_spans(self, texts):
        if self._piece_bytes is None:
            return None
        encoded = self.processor.encode(texts, num_threads=self.threads)
        # One running sum over the whole batch, cut per text: numpy per batch, not per text.
        sizes = np.fromiter(map(len, encoded), np.int64, len(encoded))
        widths = self._piece_bytes[np.fromiter(itertools.chain.from_iterable(encoded), np.int64, int(sizes.sum()))]
        running = np.cumsum(widths)
        last = np.cumsum(sizes) - 1
        before = np.concatenate(([0], running[last[:-1]])) if len(sizes) else sizes
        out, first = [], 0
        for text, ids, size, base in zip(texts, encoded, sizes.tolist(), before.tolist()):
            ends = running[first:first + size] - base
            starts = ends - widths[first:first + size]
            first += size
            total = int(ends[-1]) if size else 0
            # The dummy prefix is one space before the text; anything else (an unknown piece)
            # means the spans cannot be trusted.
            extra = total - (len(text) if text.isascii() else len(text.encode("utf-8")))
            if extra not in (0, self._dummy_prefix):
                out.append(None)
                continue
            if extra:
                ends = ends - extra
                starts = np.maximum(starts - extra, 0)
            out.append((ids, starts, ends))
        return out

    def span_length(self, text):
        return len(text) if text.isascii() else len(text.encode("utf-8"))

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


# Parts of a tokenizer.json whose offsets are the pieces' spans in the input and whose encoding
# of a prefix ends as the encoding of the whole does (at a piece boundary, see tokenize_examples).
# A normaliser such as Strip, or BPE with ignore_merges (LLaMA-3: a whole pre-token in the
# vocabulary is one piece), breaks the second: such tokenizers take the two-pass rule.
_SPAN_SAFE = {
    "normalizer": {None, "NFC", "NFD", "NFKC", "NFKD", "Prepend", "Replace", "Sequence"},
    "pre_tokenizer": {None, "ByteLevel", "Metaspace", "Split", "Digits", "Punctuation", "Whitespace",
                      "WhitespaceSplit", "Sequence"},
    "model": {"BPE", "Unigram"},
}


def _types(node) -> List[Optional[str]]:
    if node is None:
        return [None]
    found = [node.get("type")]
    for child in node.get("normalizers", []) + node.get("pretokenizers", []):
        found.extend(_types(child))
    return found


def _spans_safe(config: dict) -> bool:
    for part, allowed in _SPAN_SAFE.items():
        if not set(_types(config.get(part))) <= allowed:
            return False
    return not config.get("model", {}).get("ignore_merges", False)


class HFTokenizer(Tokenizer):
    kind = "huggingface"

    def __init__(self, directory: str):
        from tokenizers import Tokenizer as RustTokenizer

        self.file = os.path.join(directory, "tokenizer.json")
        try:
            with open(self.file, encoding="utf-8") as handle:
                self._spans = _spans_safe(json.load(handle))
            self.tokenizer = RustTokenizer.from_file(self.file)
        except Exception as error:  # tokenizers raises bare Exceptions on a malformed file
            raise _not_a_tokenizer(self.file, error) from None
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as handle:
                    config.update(json.load(handle))
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.token_id(_special_token(config, "bos_token") or "")
        self.eos_id = self.token_id(_special_token(config, "eos_token") or "")
        # The model's embedding table has the vocabulary size its config.json declares; a
        # token added past it (tokenizers numbers added tokens after the last one) would index
        # past the table at training time.
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        largest = max(vocab.values(), default=-1)
        declared, where = self.vocab_size, "counted in it"
        model_config = os.path.join(directory, "config.json")
        if os.path.exists(model_config):
            with open(model_config, encoding="utf-8") as handle:
                declared = json.load(handle).get("vocab_size", declared)
            where = f"declared in {model_config}"
        if largest >= declared:
            name = next(token for token, index in vocab.items() if index == largest)
            raise ValueError(f"{self.file}: token id {largest} ({name!r}) is beyond the vocabulary of {declared} {where}")

    def encode(self, texts):
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_spans(self, texts):
        if not self._spans:
            return None
        out = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            offsets = encoding.offsets
            out.append((encoding.ids, [o[0] for o in offsets], [o[1] for o in offsets]))
        return out

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_id(self, text):
        return self.tokenizer.token_to_id(text) if text else None
