"""Instruction data -> megatron-core indexed datasets of token ids and loss masks.

Output, for ``--output-prefix P``: ``P_tokens.bin/.idx`` and ``P_loss_mask.bin/.idx``
(one sequence per sample, equal lengths) and ``P_meta.json`` (written last: a prefix without
it is incomplete). Everything is written under temporary names and moved into place only
when complete, so an interrupted run never leaves a pair that looks finished.

Truncation: a sample longer than ``seq_length`` tokens is cut at the end (losing the end of
its response and its EOS) and counted as truncated; one left with no response token is
dropped and counted under ``dropped.no_response_after_truncation``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from symnoise_megatron.data import formats, readers
from symnoise_megatron.data.formats import RowError
from symnoise_megatron.data.templates import Example, Template, default_template, get_template
from symnoise_megatron.data.tokenizer import Tokenizer, TokenizerSpec

ON_ERROR = ("fail", "skip")
TURNS = ("first", "all")


@dataclass
class PreprocessConfig:
    """Attributes:
        inputs: files or globs (JSON, JSONL, parquet) or saved ``datasets`` directories.
        output_prefix: the path prefix of the output files.
        tokenizer: the tokenizer to use.
        format: ``auto`` (detected from each file's columns) or one of ``formats.FORMATS``.
        prompt_template: ``alpaca``, ``vicuna_v1.1``, ``chatml`` or ``none``; default:
            Vicuna v1.1 for ShareGPT, Alpaca for the rest.
        prompt_key, response_key: a generic two-column layout instead of ``format``.
        turns: ``first`` keeps a conversation's first exchange (the paper), ``all`` every one.
        seq_length: longest sample in tokens, BOS and EOS included (the paper: 512).
        workers: tokenizing processes.
        on_error: ``fail`` at the first bad row, or ``skip`` bad rows and count them.
        split: the split of a ``datasets`` directory (default ``train``).
        chunk_rows: rows handed to a worker at a time.
        progress: show a progress bar.
    """

    inputs: List[str]
    output_prefix: str
    tokenizer: TokenizerSpec
    format: str = "auto"
    prompt_template: Optional[str] = None
    prompt_key: Optional[str] = None
    response_key: Optional[str] = None
    turns: str = "first"
    seq_length: int = 512
    workers: int = 1
    on_error: str = "fail"
    split: Optional[str] = None
    chunk_rows: int = 512
    progress: bool = True

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.turns not in TURNS:
            raise ValueError(f"--turns must be one of {TURNS}, got {self.turns!r}")
        if self.seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {self.seq_length}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")


@dataclass
class Tokenized:
    tokens: List[int]
    loss_mask: List[int]


def segment_boundaries(encodings: List[List[int]]) -> List[int]:
    """Token counts settled by each cumulative prefix of a text.

    ``encodings[j]`` encodes segments ``0..j`` joined. A token of the full encoding belongs
    to the first segment whose prefix encoding already agrees with it; a token merged across
    a boundary belongs to the later segment.
    """
    full = encodings[-1]
    bounds = []
    for encoded in encodings[:-1]:
        settled = 0
        for a, b in zip(encoded, full):
            if a != b:
                break
            settled += 1
        bounds.append(min(settled, len(encoded)))
    bounds.append(len(full))
    return bounds


def render_chunks(template: Template, example: Example):
    """Segments grouped into chunks that end with an EOS token (or the sample's end)."""
    chunks, current = [], []
    for segment in template.render(example):
        current.append(segment)
        if segment.eos_after:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def tokenize_examples(
    examples: List[Example], template: Template, tokenizer: Tokenizer
) -> List[Tokenized]:
    """Token ids and loss masks (1 on response tokens and the EOS ending them)."""
    texts, plan = [], []
    for example in examples:
        sample_plan = []
        for chunk in render_chunks(template, example):
            first = len(texts)
            prefix = ""
            for segment in chunk:
                prefix += segment.text
                texts.append(prefix)
            sample_plan.append((first, chunk))
        plan.append(sample_plan)
    encoded = tokenizer.encode(texts)

    out = []
    for sample_plan in plan:
        tokens, mask = [], []
        if template.add_bos and tokenizer.bos_id is not None:
            tokens.append(tokenizer.bos_id)
            mask.append(0)
        for first, chunk in sample_plan:
            encodings = encoded[first:first + len(chunk)]
            full = encodings[-1]
            start = 0
            for segment, end in zip(chunk, segment_boundaries(encodings)):
                tokens.extend(full[start:end])
                mask.extend([int(segment.is_response)] * (end - start))
                start = end
            if chunk[-1].eos_after and tokenizer.eos_id is not None:
                tokens.append(tokenizer.eos_id)
                mask.append(1)
        out.append(Tokenized(tokens, mask))
    return out


@dataclass
class ChunkResult:
    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: List[int]
    rows: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    errors: List[Tuple[str, int, str, str]] = field(default_factory=list)  # source, row, reason, message


_WORKER: Dict[str, object] = {}


def _init_worker(config: PreprocessConfig, template_name: str):
    # Workers import neither torch nor megatron: only the tokenizer, so they start fast.
    _WORKER["tokenizer"] = config.tokenizer.load()
    _WORKER["template"] = get_template(template_name)
    _WORKER["config"] = config


def _parse(raw: readers.RawRow) -> dict:
    if isinstance(raw.payload, dict):
        return raw.payload
    try:
        value = json.loads(raw.payload)
    except json.JSONDecodeError as error:
        raise RowError("malformed_json", f"malformed JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(value, dict):
        raise RowError("not_an_object", f"expected a JSON object, got {type(value).__name__}")
    return value


def _process_chunk(job) -> ChunkResult:
    format_name, rows = job
    config: PreprocessConfig = _WORKER["config"]
    converter = formats.get_converter(format_name, config.prompt_key, config.response_key)
    result = ChunkResult(np.empty(0, np.int32), np.empty(0, np.uint8), [], rows=len(rows))
    examples = []
    for raw in rows:
        try:
            examples.append(converter(_parse(raw), config.turns))
        except RowError as error:
            result.errors.append((raw.source, raw.row, error.reason, str(error)))
    samples = tokenize_examples(examples, _WORKER["template"], _WORKER["tokenizer"])
    kept_tokens, kept_masks = [], []
    for sample in samples:
        tokens, mask = sample.tokens, sample.loss_mask
        if len(tokens) > config.seq_length:
            tokens, mask = tokens[: config.seq_length], mask[: config.seq_length]
            if not any(mask):
                result.dropped["no_response_after_truncation"] += 1
                continue
            result.truncated += 1
        kept_tokens.append(tokens)
        kept_masks.append(mask)
        result.lengths.append(len(tokens))
    if kept_tokens:
        result.tokens = np.fromiter((t for s in kept_tokens for t in s), np.int32)
        result.loss_mask = np.fromiter((m for s in kept_masks for m in s), np.uint8)
    return result


def output_paths(prefix: str) -> Dict[str, str]:
    return {
        "tokens": f"{prefix}_tokens",
        "loss_mask": f"{prefix}_loss_mask",
        "meta": f"{prefix}_meta.json",
    }


def _resolve_formats(config: PreprocessConfig, paths: List[str]) -> Dict[str, str]:
    if config.prompt_key or config.response_key:
        formats.get_converter("", config.prompt_key, config.response_key)
        return {path: "generic" for path in paths}
    if config.format != "auto":
        formats.get_converter(config.format)
        return {path: config.format for path in paths}
    return {path: formats.detect_format(list(readers.first_record(path, config.split))) for path in paths}


def _resolve_template(config: PreprocessConfig, file_formats: Dict[str, str], tokenizer: Tokenizer) -> Template:
    name = config.prompt_template
    if name is None:
        defaults = {default_template(f) for f in file_formats.values()}
        if len(defaults) > 1:
            raise ValueError(f"inputs of different formats default to different templates {sorted(defaults)}; pass --prompt-template")
        name = defaults.pop()
    template = get_template(name)
    if config.turns == "all" and not template.multi_turn:
        raise ValueError(f"--turns all needs a multi-turn template; {name!r} renders one exchange")
    for token in template.special_tokens:
        if tokenizer.token_id(token) is None:
            raise ValueError(f"--prompt-template {name} needs {token!r} as one token, and the tokenizer at {config.tokenizer.path} has no such token")
    return template


def _jobs(config: PreprocessConfig, file_formats: Dict[str, str]):
    for path, format_name in file_formats.items():
        chunk = []
        for raw in readers.read_rows(path, config.split):
            chunk.append(raw)
            if len(chunk) == config.chunk_rows:
                yield format_name, chunk
                chunk = []
        if chunk:
            yield format_name, chunk


def _write_chunk(builder, values: np.ndarray, lengths: List[int]) -> None:
    """A chunk of samples in one write, each its own document (as add_item + end_document)."""
    if not lengths:
        return
    builder.add_document(values, lengths)
    total = len(builder.sequence_lengths)
    builder.document_indices[-1:] = range(total - len(lengths) + 1, total + 1)


def _length_histogram(lengths: np.ndarray, seq_length: int) -> Dict[str, int]:
    edges = [0] + [2**k for k in range(4, 32) if 2**k < seq_length] + [seq_length]
    counts, _ = np.histogram(lengths, bins=edges + [seq_length + 1])
    return {f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo): int(c) for lo, hi, c in zip(edges, edges[1:] + [seq_length + 1], counts)}


def preprocess(config: PreprocessConfig) -> dict:
    """Tokenize the inputs and write the indexed datasets; returns the meta dict."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    paths = readers.expand_inputs(config.inputs)
    tokenizer = config.tokenizer.load()
    file_formats = _resolve_formats(config, paths)
    template = _resolve_template(config, file_formats, tokenizer)
    out = output_paths(config.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(config.output_prefix)), exist_ok=True)
    token_dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    temporary = {key: f"{path}.tmp-{os.getpid()}" for key, path in out.items()}
    builders = {
        "tokens": IndexedDatasetBuilder(temporary["tokens"] + ".bin", dtype=token_dtype),
        "loss_mask": IndexedDatasetBuilder(temporary["loss_mask"] + ".bin", dtype=np.uint8),
    }
    counts = Counter()
    dropped, skipped = Counter(), Counter()
    skipped_examples: List[str] = []
    all_lengths: List[np.ndarray] = []
    total_rows = None
    if config.progress:
        row_counts = [readers.count_rows(p) for p in paths]
        total_rows = sum(row_counts) if None not in row_counts else None
    bar = tqdm(total=total_rows, unit="rows", desc="preprocess", disable=not config.progress, dynamic_ncols=True)
    context = multiprocessing.get_context("spawn")
    pool = None
    try:
        if config.workers == 1:
            _init_worker(config, template.name)
            results = map(_process_chunk, _jobs(config, file_formats))
        else:
            pool = context.Pool(config.workers, initializer=_init_worker, initargs=(config, template.name))
            results = pool.imap(_process_chunk, _jobs(config, file_formats), chunksize=1)
        for result in results:
            for source, row, reason, message in result.errors:
                if config.on_error == "fail":
                    raise ValueError(f"{source}: row {row}: {message} (use --on-error skip to skip and count bad rows)")
                skipped[reason] += 1
                if len(skipped_examples) < 20:
                    skipped_examples.append(f"{source}: row {row}: {message}")
            _write_chunk(builders["tokens"], result.tokens, result.lengths)
            _write_chunk(builders["loss_mask"], result.loss_mask, result.lengths)
            counts["rows"] += result.rows
            counts["samples"] += len(result.lengths)
            counts["tokens"] += int(result.tokens.size)
            counts["response_tokens"] += int(result.loss_mask.sum())
            counts["truncated"] += result.truncated
            dropped.update(result.dropped)
            all_lengths.append(np.asarray(result.lengths, dtype=np.int64))
            bar.update(result.rows)
        if pool is not None:
            pool.close()
            pool.join()
        for key, builder in builders.items():
            builder.finalize(temporary[key] + ".idx")
    except BaseException:
        bar.close()
        if pool is not None:
            pool.terminate()
        for key in ("tokens", "loss_mask"):
            for suffix in (".bin", ".idx"):
                if os.path.exists(temporary[key] + suffix):
                    os.remove(temporary[key] + suffix)
        raise
    bar.close()
    elapsed = time.perf_counter() - started
    lengths = np.concatenate(all_lengths) if all_lengths else np.empty(0, np.int64)
    meta = {
        "format_version": 1,
        "inputs": paths,
        "formats": file_formats,
        "prompt_template": template.name,
        "turns": config.turns,
        "tokenizer": {"path": os.path.abspath(config.tokenizer.path)} | tokenizer.identity(),
        "seq_length": config.seq_length,
        "token_dtype": np.dtype(token_dtype).name,
        "rows_read": counts["rows"],
        "samples": counts["samples"],
        "tokens": counts["tokens"],
        "response_tokens": counts["response_tokens"],
        "truncated": counts["truncated"],
        "dropped": dict(dropped),
        "skipped_rows": dict(skipped),
        "skipped_examples": skipped_examples,
        "length_histogram": _length_histogram(lengths, config.seq_length),
        # What the loader checks before training: an .idx or .bin from another run shows here.
        "file_bytes": {os.path.basename(out[key] + suffix): os.path.getsize(temporary[key] + suffix)
                       for key in ("tokens", "loss_mask") for suffix in (".bin", ".idx")},
        "workers": config.workers,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(counts["samples"] / elapsed, 1) if elapsed else None,
        "tokens_per_second": round(counts["tokens"] / elapsed, 1) if elapsed else None,
    }
    if os.path.exists(out["meta"]):
        os.remove(out["meta"])  # until the new meta lands, the prefix reads as incomplete
    for key in ("tokens", "loss_mask"):
        for suffix in (".bin", ".idx"):
            os.replace(temporary[key] + suffix, out[key] + suffix)
    with open(temporary["meta"], "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2)
    os.replace(temporary["meta"], out["meta"])
    return meta
