#!/usr/bin/env python
"""Preprocessing throughput: tokens/s per worker count, against a per-row baseline in the same run.

Generates a JSONL of ``--rows`` Alpaca rows (AlpacaEval's 805 answers from ../shared/data
when present, else the bundled set, cycled with a row number appended so no two rows are
equal), then times ``symnoise_megatron.data.preprocess`` at each worker count.

The baseline is the design of Megatron-LM's tools/preprocess_data.py rebuilt here on the
same tokenizer, template and writer: a pool mapping single JSON lines (chunksize 32), one
tokenizer call per text, one result per row. It does the same work and writes the same
files, so the ratio is the gain of batching rows per worker call. Megatron-LM's own tool is
not on PyPI; compare against it on a machine that has its repository.
"""

import argparse
import json
import multiprocessing
import os
import tempfile
import time

import numpy as np

from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
from symnoise_megatron.data import preprocess as pp
from symnoise_megatron.data.formats import FORMATS
from symnoise_megatron.data.templates import get_template
from symnoise_megatron.data.tokenizer import TokenizerSpec

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "alpaca_eval_text_davinci_003.json")
TOKENIZER = TokenizerSpec(model_file=BUNDLED_TOKENIZER)


def write_jsonl(path, count):
    origin = SHARED if os.path.exists(SHARED) else BUNDLED_INSTRUCTIONS
    with open(origin, encoding="utf-8") as handle:
        rows = [r for r in json.load(handle) if r.get("output", "").strip()]
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(count):
            row = rows[index % len(rows)]
            handle.write(json.dumps({"instruction": f"{row['instruction']} (#{index})",
                                     "input": row.get("input", ""), "output": row["output"]}) + "\n")
    return origin


_STATE = {}


def _baseline_init():
    _STATE["tokenizer"] = TOKENIZER.load()
    _STATE["template"] = get_template("alpaca")


def _baseline_row(line):
    example = FORMATS["alpaca"](json.loads(line), "first")
    sample = pp.tokenize_examples([example], _STATE["template"], _STATE["tokenizer"])[0]
    return np.asarray(sample.tokens[:512], np.uint16), np.asarray(sample.loss_mask[:512], np.uint8)


def run_baseline(jsonl, workers, prefix):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    started = time.perf_counter()
    tokens_builder = IndexedDatasetBuilder(prefix + "_tokens.bin", dtype=np.uint16)
    mask_builder = IndexedDatasetBuilder(prefix + "_loss_mask.bin", dtype=np.uint8)
    total = 0
    with open(jsonl, encoding="utf-8") as handle, \
            multiprocessing.get_context("spawn").Pool(workers, initializer=_baseline_init) as pool:
        for tokens, mask in pool.imap(_baseline_row, handle, chunksize=32):
            tokens_builder.add_item(torch.from_numpy(tokens.astype(np.int64)))
            tokens_builder.end_document()
            mask_builder.add_item(torch.from_numpy(mask))
            mask_builder.end_document()
            total += tokens.size
    tokens_builder.finalize(prefix + "_tokens.idx")
    mask_builder.finalize(prefix + "_loss_mask.idx")
    return total / (time.perf_counter() - started)


def run_batched(jsonl, workers, prefix):
    config = pp.PreprocessConfig(inputs=[jsonl], output_prefix=prefix, tokenizer=TOKENIZER, workers=workers, progress=False)
    started = time.perf_counter()
    meta = pp.preprocess(config)
    return meta["tokens"] / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    import megatron.core  # noqa: F401  (import once, outside the timings)

    with tempfile.TemporaryDirectory() as directory:
        jsonl = os.path.join(directory, "bench.jsonl")
        origin = write_jsonl(jsonl, args.rows)
        print(f"input: {args.rows} rows cycled from {os.path.basename(origin)}; tokenizer: bundled "
              f"SentencePiece (1024 pieces); {os.cpu_count()} CPUs; wall clock includes worker start-up")
        print(f"{'workers':>8} {'tokens/s':>12} {'per-row baseline':>17} {'ratio':>6} {'scaling':>8}")
        first = None
        for workers in args.workers:
            batched = run_batched(jsonl, workers, os.path.join(directory, f"batched{workers}"))
            baseline = run_baseline(jsonl, workers, os.path.join(directory, f"baseline{workers}"))
            first = first or batched
            print(f"{workers:>8} {batched:>12,.0f} {baseline:>17,.0f} {batched / baseline:>6.2f} {batched / first:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
