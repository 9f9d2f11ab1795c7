"""What a preprocessed prefix is, in a few fields a run records and a resume compares: its
tokenizer and template (from the meta), its sample count, its files' sizes and a content digest.

The digest is cheap on purpose (a resume computes it at every start): the SHA-256 of both
``.idx`` files whole (every sample's length and offset) and of the first and last MiB of both
``.bin`` files, with their sizes. Another data set, or this one preprocessed again from other
rows or with another template or tokenizer, changes it; reading every token of a 70B run's data
at each start would not be cheap.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Optional

from symnoise_megatron.common.files import read_json
from symnoise_megatron.data.preprocess import output_paths

SAMPLED_BIN_BYTES = 1 << 20
# The meta's tokenizer fields that name it (its path on the preprocessing machine does not).
TOKENIZER_FIELDS = ("kind", "file", "sha256", "vocab_size", "bos_id", "eos_id")


def read_meta(prefix: str) -> dict:
    """``PREFIX_meta.json``; a missing or unreadable one is a one-line error naming it."""
    path = output_paths(prefix)["meta"]
    try:
        meta = read_json(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {prefix} is not a finished preprocessed prefix") from None
    if not isinstance(meta, dict) or "samples" not in meta or "tokenizer" not in meta:
        raise ValueError(f"{path}: not a meta file written by symnoise-preprocess (no 'samples' or 'tokenizer')")
    return meta


def content_digest(prefix: str) -> str:
    """``sha256:<hex>`` of the prefix's index files and the ends of its data files (see above)."""
    digest = hashlib.sha256()
    for key in ("tokens", "loss_mask"):
        base = output_paths(prefix)[key]
        with open(base + ".idx", "rb") as handle:
            digest.update(handle.read())
        size = os.path.getsize(base + ".bin")
        digest.update(size.to_bytes(8, "little"))
        with open(base + ".bin", "rb") as handle:
            digest.update(handle.read(SAMPLED_BIN_BYTES))
            if size > SAMPLED_BIN_BYTES:
                handle.seek(max(SAMPLED_BIN_BYTES, size - SAMPLED_BIN_BYTES))
                digest.update(handle.read())
    return "sha256:" + digest.hexdigest()


def prefix_identity(prefix: str, meta: Optional[dict] = None) -> Dict[str, object]:
    """The prefix (absolute), its samples and tokens, template, tokenizer, file sizes and digest."""
    meta = read_meta(prefix) if meta is None else meta
    paths = output_paths(prefix)
    return {
        "prefix": os.path.abspath(prefix),
        "samples": meta["samples"],
        "tokens": meta.get("tokens"),
        "prompt_template": meta.get("prompt_template"),
        "tokenizer": {key: meta["tokenizer"][key] for key in TOKENIZER_FIELDS if key in meta["tokenizer"]},
        "file_bytes": {os.path.basename(paths[key] + suffix): os.path.getsize(paths[key] + suffix)
                       for key in ("tokens", "loss_mask") for suffix in (".bin", ".idx")},
        "digest": content_digest(prefix),
    }
