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

import bisect
import glob
import json
import multiprocessing
import os
import re
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from symnoise_megatron.common.processes import pid_alive
from symnoise_megatron.data import formats, readers
from symnoise_megatron.data.formats import RowError
from symnoise_megatron.data.templates import Example, Template, default_template, get_template
from symnoise_megatron.data.tokenizer import Tokenizer, TokenizerSpec

ON_ERROR = ("fail", "skip")
TURNS = ("first", "all")
BOUNDARY_RULES = ("spans", "two-pass")


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
        boundary_rule: ``spans`` (one encoding per sample) or ``two-pass`` (the reference:
            the same files, the tokenizer's work doubled).
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
    boundary_rule: str = "spans"

    def __post_init__(self):
        if self.on_error not in ON_ERROR:
            raise ValueError(f"--on-error must be one of {ON_ERROR}, got {self.on_error!r}")
        if self.turns not in TURNS:
            raise ValueError(f"--turns must be one of {TURNS}, got {self.turns!r}")
        if self.seq_length < 2:
            raise ValueError(f"--seq-length must be at least 2, got {self.seq_length}")
        if self.boundary_rule not in BOUNDARY_RULES:
            raise ValueError(f"boundary rule must be one of {BOUNDARY_RULES}, got {self.boundary_rule!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        # P_tokens.bin goes next to P: a prefix ending in "/" would name files inside a folder
        # that nothing creates, and fail only after the inputs are read.
        if self.output_prefix.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)):
            raise ValueError(f"--output-prefix {self.output_prefix} names a directory; "
                             f"give a prefix such as {os.path.join(self.output_prefix, 'train')}")


def segment_boundaries(encodings: List[List[int]]) -> List[int]:
    """Token counts settled by each cumulative prefix of a text (the two-pass rule).

    ``encodings[j]`` encodes segments ``0..j`` joined. A token of the full encoding belongs
    to the first segment whose prefix encoding already agrees with it; a token merged across
    a boundary belongs to the later segment (Stanford Alpaca's rule: tokenize the prompt
    alone and prompt + response; the response starts where they first differ).
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


def _span_bounds(text: str, cuts: List[int], spans, tokenizer: Tokenizer) -> Optional[List[int]]:
    """The two-pass rule's token counts read off one encoding's piece spans, or None where
    the spans cannot settle it.

    At a cut where one piece ends exactly and the next starts no earlier, no piece spans the
    cut, so no merge crossed it, and the prefix alone encodes as the pieces before it (BPE
    merges on one side never depend on the other; Viterbi's best path through the cut is the
    best path to it): both rules agree. Left to the two-pass rule: a piece across the cut; an
    empty segment; whitespace on both sides of the cut or two whitespace characters before it
    (pre-tokenizers such as GPT-2's split a whitespace run by what follows it); spans that do
    not add up to the text."""
    if spans is None:
        return None
    ids, starts, ends = spans
    count = len(ids)
    bounds, previous = [], 0
    for cut in cuts:
        if cut <= previous:
            return None
        if text[cut - 1].isspace() and ((cut >= 2 and text[cut - 2].isspace()) or (cut < len(text) and text[cut].isspace())):
            return None
        unit_cut = tokenizer.span_length(text[:cut])
        bound = bisect.bisect_right(ends, unit_cut)
        if bound == 0 or ends[bound - 1] != unit_cut or (bound < count and starts[bound] < unit_cut):
            return None
        bounds.append(bound)
        previous = cut
    bounds.append(count)
    return bounds


def tokenize_examples(examples: List[Example], template: Template, tokenizer: Tokenizer,
                      rule: str = "spans", stats: Optional[Counter] = None) -> List[Tuple[List[int], bytes]]:
    """Token ids and loss masks (1 on response tokens and the EOS ending them), per example.

    ``rule="spans"`` encodes each chunk once and places its segment boundaries from the
    pieces' spans, taking the two-pass rule (:func:`segment_boundaries`) only for the chunks
    the spans cannot settle; ``rule="two-pass"`` encodes every cumulative prefix (the
    reference: both give the same files). ``stats`` counts the chunks each rule placed."""
    if rule not in BOUNDARY_RULES:
        raise ValueError(f"unknown boundary rule {rule!r}; known: {BOUNDARY_RULES}")
    chunks, owners = [], []  # per chunk: (segments, joined text, cut positions); its sample
    for index, example in enumerate(examples):
        for chunk in render_chunks(template, example):
            cuts, text = [], ""
            for segment in chunk[:-1]:
                text += segment.text
                cuts.append(len(text))
            chunks.append((chunk, text + chunk[-1].text, cuts))
            owners.append(index)
    bounds: List[Optional[List[int]]] = [None] * len(chunks)
    ids: List[Optional[List[int]]] = [None] * len(chunks)
    if rule == "spans":
        spans = tokenizer.encode_spans([text for _, text, _ in chunks])
        if spans is not None:
            for position, ((_, text, cuts), span) in enumerate(zip(chunks, spans)):
                if span is not None:
                    ids[position] = span[0]
                    bounds[position] = _span_bounds(text, cuts, span, tokenizer) if cuts else [len(span[0])]
    pending = [position for position, found in enumerate(bounds) if found is None]
    if stats is not None:
        stats["two-pass"] += len(pending)
        stats["spans"] += len(chunks) - len(pending)
    if pending:
        texts = []
        for position in pending:
            prefix = ""
            for segment in chunks[position][0]:
                prefix += segment.text
                texts.append(prefix)
        encoded = tokenizer.encode(texts)
        first = 0
        for position in pending:
            size = len(chunks[position][0])
            encodings = encoded[first:first + size]
            first += size
            ids[position], bounds[position] = encodings[-1], segment_boundaries(encodings)

    bos = [tokenizer.bos_id] if template.add_bos and tokenizer.bos_id is not None else []
    eos = tokenizer.eos_id
    out = [(list(bos), bytearray(len(bos))) for _ in examples]
    for (chunk, _, _), owner, full, chunk_bounds in zip(chunks, owners, ids, bounds):
        tokens, mask = out[owner]
        start = 0
        for segment, end in zip(chunk, chunk_bounds):
            # As the two-pass rule has always done: a bound below the previous one adds nothing.
            tokens.extend(full[start:end])
            mask.extend((b"\x01" if segment.is_response else b"\x00") * max(end - start, 0))
            start = end
        if chunk[-1].eos_after and eos is not None:
            tokens.append(eos)
            mask.append(1)
    return [(tokens, bytes(mask)) for tokens, mask in out]


@dataclass
class ChunkResult:
    tokens: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    rows: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    boundaries: Counter = field(default_factory=Counter)
    errors: List[Tuple[str, int, str, str]] = field(default_factory=list)  # source, row, reason, message


_WORKER: Dict[str, object] = {}


def _init_worker(config: PreprocessConfig, template_name: str):
    # Workers import neither torch nor megatron: only the tokenizer, so they start fast.
    _WORKER["tokenizer"] = config.tokenizer.load()
    _WORKER["template"] = get_template(template_name)
    _WORKER["config"] = config
    _WORKER["dtype"] = token_dtype(_WORKER["tokenizer"])


def _process_chunk(job) -> ChunkResult:
    format_name, rows = job
    config: PreprocessConfig = _WORKER["config"]
    converter = formats.get_converter(format_name, config.prompt_key, config.response_key)
    result = ChunkResult(np.empty(0, _WORKER["dtype"]), np.empty(0, np.uint8), np.empty(0, np.int32), rows=len(rows))
    examples = []
    for raw in rows:
        try:
            examples.append(converter(readers.decode_row(raw), config.turns))
        except RowError as error:
            result.errors.append((raw.source, raw.row, error.reason, str(error)))
    samples = tokenize_examples(examples, _WORKER["template"], _WORKER["tokenizer"], config.boundary_rule, result.boundaries)
    kept_tokens, kept_masks, lengths = [], [], []
    limit = config.seq_length
    for tokens, mask in samples:
        if len(tokens) > limit:
            tokens, mask = tokens[:limit], mask[:limit]
            if 1 not in mask:
                result.dropped["no_response_after_truncation"] += 1
                continue
            result.truncated += 1
        kept_tokens.extend(tokens)
        kept_masks.append(mask)
        lengths.append(len(tokens))
    if lengths:
        values = np.array(kept_tokens, np.int64)
        vocab = _WORKER["tokenizer"].vocab_size
        if values.max() >= vocab or values.min() < 0:
            bad = int(values[(values >= vocab) | (values < 0)][0])
            raise ValueError(f"{config.tokenizer.path}: the tokenizer produced id {bad}, outside its vocabulary "
                             f"of {vocab} (rows {rows[0].row}-{rows[-1].row} of {rows[0].source})")
        result.tokens = values.astype(_WORKER["dtype"])
        result.loss_mask = np.frombuffer(b"".join(kept_masks), np.uint8)
        result.lengths = np.array(lengths, np.int32)
    return result


def token_dtype(tokenizer: Tokenizer):
    return np.uint16 if tokenizer.vocab_size < 65500 else np.int32


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


class IndexedWriter:
    """megatron-core's ``IndexedDatasetBuilder`` format, one document per sample, written
    without importing megatron-core (and torch): that import costs more than tokenizing
    100,000 samples. The files are byte-identical to the builder's (tests compare them)."""

    _HEADER = b"MMIDIDX\x00\x00"
    _DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int32): 4, np.dtype(np.uint16): 8}

    def __init__(self, bin_path: str, dtype):
        self.dtype = np.dtype(dtype)
        self.bin_path = bin_path
        self.handle = open(bin_path, "wb")
        self.lengths: List[np.ndarray] = []

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths):
            try:
                self.handle.write(np.ascontiguousarray(values, self.dtype).tobytes())
            except OSError as error:  # a full disk names no file
                raise OSError(error.errno, error.strerror, self.bin_path) from None
            self.lengths.append(np.asarray(lengths, np.int32))

    def finalize(self, idx_path: str) -> None:
        try:
            self.handle.close()
        except OSError as error:
            raise OSError(error.errno, error.strerror, self.bin_path) from None
        lengths = np.concatenate(self.lengths) if self.lengths else np.empty(0, np.int32)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        try:
            with open(idx_path, "wb") as index:
                index.write(self._HEADER + struct.pack("<Q", 1) + struct.pack("<B", self._DTYPE_CODES[self.dtype]))
                index.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(lengths) + 1))
                index.write(lengths.tobytes() + pointers.tobytes() + np.arange(len(lengths) + 1, dtype=np.int64).tobytes())
        except OSError as error:
            raise OSError(error.errno, error.strerror, idx_path) from None

    def close(self) -> None:
        self.handle.close()


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Temporary files of interrupted runs on this prefix (``*.tmp-PID*``, PID dead): removed."""
    removed = []
    # This prefix's own outputs only: data/alpaca must not touch data/alpaca_gpt4's files.
    candidates = [p for out in output_paths(prefix).values() for p in glob.glob(glob.escape(out) + ".tmp-*")]
    for path in candidates:
        match = re.search(r"\.tmp-(\d+)(\.bin|\.idx)?$", path)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            os.remove(path)
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) left by interrupted runs: {', '.join(sorted(removed))}", file=sys.stderr)
    return removed


def _length_histogram(lengths: np.ndarray, seq_length: int) -> Dict[str, int]:
    edges = [0] + [2**k for k in range(4, 32) if 2**k < seq_length] + [seq_length]
    counts, _ = np.histogram(lengths, bins=edges + [seq_length + 1])
    return {f"{lo}-{hi - 1}" if hi - 1 > lo else str(lo): int(c) for lo, hi, c in zip(edges, edges[1:] + [seq_length + 1], counts)}


def preprocess(config: PreprocessConfig) -> dict:
    """Tokenize the inputs and write the indexed datasets; returns the meta dict."""
    started = time.perf_counter()
    paths = readers.expand_inputs(config.inputs)
    tokenizer = config.tokenizer.load()
    file_formats = _resolve_formats(config, paths)
    template = _resolve_template(config, file_formats, tokenizer)
    out = output_paths(config.output_prefix)
    folder = os.path.dirname(os.path.abspath(config.output_prefix))
    dtype = token_dtype(tokenizer)
    total_rows = None
    if config.progress:  # before any file is opened: a bad input leaves nothing behind
        row_counts = [readers.count_rows(p) for p in paths]
        total_rows = sum(row_counts) if None not in row_counts else None
    temporary = {key: f"{path}.tmp-{os.getpid()}" for key, path in out.items()}
    counts = Counter()
    dropped, skipped, boundaries = Counter(), Counter(), Counter()
    skipped_examples: List[str] = []
    all_lengths: List[np.ndarray] = []
    context = multiprocessing.get_context("spawn")
    pool = bar = None
    builders = {}
    # One try from the first temporary file on: a Ctrl-C anywhere after it removes them all.
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(config.output_prefix)
        builders["tokens"] = IndexedWriter(temporary["tokens"] + ".bin", dtype)
        builders["loss_mask"] = IndexedWriter(temporary["loss_mask"] + ".bin", np.uint8)
        bar = tqdm(total=total_rows, unit="rows", desc="preprocess", disable=not config.progress, dynamic_ncols=True)
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
            builders["tokens"].add(result.tokens, result.lengths)
            builders["loss_mask"].add(result.loss_mask, result.lengths)
            counts["rows"] += result.rows
            counts["samples"] += len(result.lengths)
            counts["tokens"] += int(result.tokens.size)
            counts["response_tokens"] += int(result.loss_mask.sum())
            counts["truncated"] += result.truncated
            dropped.update(result.dropped)
            boundaries.update(result.boundaries)
            all_lengths.append(result.lengths)
            bar.update(result.rows)
        if pool is not None:
            pool.close()
            pool.join()
        if not counts["samples"]:
            raise ValueError(f"no sample kept from {counts['rows']} row(s) of {', '.join(paths)}: skipped {dict(skipped) or 'none'}, "
                             f"dropped {dict(dropped) or 'none'}" + (f" (first: {skipped_examples[0]})" if skipped_examples else "")
                             + "; nothing written")
        for key, builder in builders.items():
            builder.finalize(temporary[key] + ".idx")
    except BaseException as error:
        if bar is not None:
            bar.close()
        if pool is not None:
            pool.terminate()
        for builder in builders.values():
            builder.close()
        _remove(temporary)
        if isinstance(error, OSError):
            raise _write_error(error, folder) from None
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
        "token_dtype": np.dtype(dtype).name,
        "rows_read": counts["rows"],
        "samples": counts["samples"],
        "tokens": counts["tokens"],
        "response_tokens": counts["response_tokens"],
        "truncated": counts["truncated"],
        "dropped": dict(dropped),
        "skipped_rows": dict(skipped),
        "skipped_examples": skipped_examples,
        "length_histogram": _length_histogram(lengths, config.seq_length),
        # Chunks (a prompt and its response) whose boundary came from one encoding's piece
        # spans, and those that needed the two-pass rule.
        "boundaries": {"spans": boundaries["spans"], "two_pass": boundaries["two-pass"]},
        # What the loader checks before training: an .idx or .bin from another run shows here.
        "file_bytes": {os.path.basename(out[key] + suffix): os.path.getsize(temporary[key] + suffix)
                       for key in ("tokens", "loss_mask") for suffix in (".bin", ".idx")},
        "workers": config.workers,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(counts["samples"] / elapsed, 1) if elapsed else None,
        "tokens_per_second": round(counts["tokens"] / elapsed, 1) if elapsed else None,
    }
    try:
        if os.path.exists(out["meta"]):
            os.remove(out["meta"])  # until the new meta lands, the prefix reads as incomplete
        for key in ("tokens", "loss_mask"):
            for suffix in (".bin", ".idx"):
                os.replace(temporary[key] + suffix, out[key] + suffix)
        with open(temporary["meta"], "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=2)
        os.replace(temporary["meta"], out["meta"])
    except OSError as error:
        _remove(temporary)
        raise _write_error(error, folder) from None
    return meta


def _remove(temporary: Dict[str, str]) -> None:
    for key, path in temporary.items():
        for suffix in (("",) if key == "meta" else (".bin", ".idx")):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)


def _write_error(error: OSError, folder: str) -> ValueError:
    """A write that failed (read-only folder, full disk) as one line naming the path."""
    where = error.filename or folder
    return ValueError(f"cannot write {where}: {error.strerror or error} (nothing was written; the partial files are removed)")
