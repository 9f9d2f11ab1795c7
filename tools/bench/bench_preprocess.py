#!/usr/bin/env python
"""Preprocessing throughput, head to head with Megatron-LM's own tools/preprocess_data.py.

Content: AlpacaEval's 805 instructions and answers (../shared/data; the bundled set when
absent) repeated ``--repeat`` times. Tokenizer: a BPE SentencePiece model of ``--vocab-size``
pieces trained on that content with tools/train_tokenizer.py's settings. Both tools run as
fresh processes (interpreter start-up and imports included in the wall time):

- this project: ``tools/preprocess_data.py --prompt-template none`` on Alpaca-format JSONL;
  the sample is ``BOS instruction \\n output EOS``, the loss mask on ``output EOS``;
- Megatron-LM (``--megatron-lm DIR``, a checkout such as tag core_v0.16.1, with six, nltk and
  tiktoken importable, e.g. through ``--megatron-pythonpath``): ``--tokenizer-type
  SentencePieceTokenizer --append-eod`` on JSONL whose ``text`` is ``instruction \\n output``,
  the same text; its token count is read from its .idx header (its own reader can crash at
  interpreter exit).

The rounds are interleaved (ours, theirs, ours, ...) so load drifts hit both alike. Printed:
wall tokens/s per run, the median ratio ours / Megatron-LM at each worker count, and the
scaling of our tool from the fewest to the most workers given (meaningful only on a machine
with at least as many cores as the largest worker count). ``--smallest``: the bundled set once,
a 400-piece tokenizer, one round with one worker, no Megatron-LM (CI runs it).
"""

import argparse
import io
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SHARED = os.path.join(ROOT, "..", "shared", "data", "alpaca_eval_text_davinci_003.json")


def load_rows(origin):
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    origin = origin if os.path.exists(origin) else BUNDLED_INSTRUCTIONS
    with open(origin, encoding="utf-8") as handle:
        rows = [r for r in json.load(handle) if r.get("output", "").strip() and r.get("instruction", "").strip()]
    return origin, rows


def write_inputs(directory, rows, repeat):
    ours, theirs = os.path.join(directory, "ours.jsonl"), os.path.join(directory, "megatron.jsonl")
    with open(ours, "w", encoding="utf-8") as a, open(theirs, "w", encoding="utf-8") as b:
        for _ in range(repeat):
            for row in rows:
                a.write(json.dumps({"instruction": row["instruction"], "input": "", "output": row["output"]}) + "\n")
                # What --prompt-template none renders for the same row.
                b.write(json.dumps({"text": f"{row['instruction']}\n{row['output']}"}) + "\n")
    return ours, theirs


def corpus(rows, origin):
    """The bench's rows, plus the other instruction sets at hand: 805 rows alone hold too few
    distinct pairs for an 8,000-piece BPE model."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

    lines = [t for r in rows for t in (r["instruction"], r["output"])]
    with open(BUNDLED_INSTRUCTIONS, encoding="utf-8") as handle:
        lines += [t for r in json.load(handle) for t in (r["instruction"], r["input"], r["output"])]
    seeds = os.path.join(os.path.dirname(origin), "self_instruct_seed_tasks.jsonl")
    if os.path.exists(seeds):
        with open(seeds, encoding="utf-8") as handle:
            for line in handle:
                row = json.loads(line)
                lines += [row["instruction"]] + [t for i in row["instances"] for t in (i["input"], i["output"])]
    return [t for t in lines if t.strip()]


def train_tokenizer(lines, vocab_size, path):
    import sentencepiece

    model = io.BytesIO()
    # tools/train_tokenizer.py's settings: BPE, LLaMA's special ids, no normalisation.
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        )
    with open(path, "wb") as handle:
        handle.write(model.getvalue())


def idx_token_count(path):
    """Sum of sequence lengths in a megatron .idx (header: magic, version, dtype, count, docs)."""
    with open(path, "rb") as handle:
        header = handle.read(9 + 8 + 1 + 8 + 8)
        assert header[:9] == b"MMIDIDX\x00\x00", path
        (count,) = struct.unpack("<Q", header[18:26])
        lengths = np.frombuffer(handle.read(4 * count), dtype=np.int32)
    return int(lengths.sum(dtype=np.int64))


def timed(command, env):
    """Wall seconds, and CPU seconds of the tool and its workers (what a shared, loaded machine
    disturbs least)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stdout[-3000:]}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run_ours(jsonl, model, workers, prefix, env):
    seconds, cpu = timed([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", jsonl,
                     "--output-prefix", prefix, "--tokenizer-model", model, "--prompt-template", "none",
                     "--workers", str(workers), "--no-progress"], env)
    with open(prefix + "_meta.json", encoding="utf-8") as handle:
        return json.load(handle)["tokens"], seconds, cpu


def run_megatron(checkout, jsonl, model, workers, prefix, env):
    seconds, cpu = timed([sys.executable, os.path.join(checkout, "tools", "preprocess_data.py"), "--input", jsonl,
                     "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                     "--tokenizer-model", model, "--append-eod", "--workers", str(workers),
                     "--log-interval", "1000000"], env)
    return idx_token_count(prefix + "_text_document.idx"), seconds, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-lm", metavar="DIR", help="a Megatron-LM checkout (tag core_v0.16.1); without it only this project's tool runs")
    parser.add_argument("--megatron-pythonpath", default="", help="extra PYTHONPATH for Megatron-LM's tool (six, nltk, tiktoken)")
    parser.add_argument("--data", default=SHARED, help="AlpacaEval's JSON (default: %(default)s; the bundled set when absent)")
    parser.add_argument("--repeat", type=int, default=40, help="times the 805 rows are repeated (default: 40, 32,200 samples)")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--smallest", action="store_true", help="the bundled set once, a 400-piece tokenizer, one round "
                        "of one worker, this project's tool only (CI runs it; the figures mean nothing)")
    args = parser.parse_args()
    if args.smallest:
        from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

        args.data, args.repeat, args.vocab_size, args.workers, args.rounds = BUNDLED_INSTRUCTIONS, 1, 400, [1], 1
        args.megatron_lm = None

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    megatron_env = dict(os.environ)
    if args.megatron_lm:
        megatron_env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(args.megatron_lm), args.megatron_pythonpath) if p)
    with tempfile.TemporaryDirectory() as directory:
        origin, rows = load_rows(args.data)
        ours_jsonl, megatron_jsonl = write_inputs(directory, rows, args.repeat)
        model = os.path.join(directory, "bpe.model")
        train_tokenizer(corpus(rows, origin), args.vocab_size, model)
        load_before = os.getloadavg()
        print(f"input: {len(rows)} rows of {os.path.basename(origin)} x {args.repeat} = {len(rows) * args.repeat} samples; "
              f"{args.vocab_size}-piece BPE SentencePiece; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}", flush=True)
        runs = {w: {"ours": [], "megatron": []} for w in args.workers}
        for round_ in range(args.rounds):
            for workers in args.workers:
                tokens, seconds, cpu = run_ours(ours_jsonl, model, workers, os.path.join(directory, "ours"), env)
                runs[workers]["ours"].append({"tokens": tokens, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                                              "tokens_per_s": round(tokens / seconds)})
                line = f"round {round_ + 1} workers {workers}: ours {tokens / seconds:,.0f} tokens/s ({tokens:,} in {seconds:.2f} s, {cpu:.2f} CPU s)"
                if args.megatron_lm:
                    tokens, seconds, cpu = run_megatron(args.megatron_lm, megatron_jsonl, model, workers, os.path.join(directory, "megatron"), megatron_env)
                    runs[workers]["megatron"].append({"tokens": tokens, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                                                      "tokens_per_s": round(tokens / seconds)})
                    ratio = runs[workers]["ours"][-1]["tokens_per_s"] / (tokens / seconds)
                    line += f"; Megatron-LM {tokens / seconds:,.0f} tokens/s ({tokens:,} in {seconds:.2f} s, {cpu:.2f} CPU s); ratio {ratio:.2f}"
                print(line, flush=True)
    summary = {"cpus": os.cpu_count(), "load_before": load_before, "samples": len(rows) * args.repeat, "vocab_size": args.vocab_size, "rounds": args.rounds, "workers": {}}
    for workers, both in runs.items():
        entry = {"ours_tokens_per_s": [r["tokens_per_s"] for r in both["ours"]]}
        if both["megatron"]:
            ratios = [o["tokens_per_s"] / m["tokens_per_s"] for o, m in zip(both["ours"], both["megatron"])]
            cpu_ratios = [(o["tokens"] / o["cpu_seconds"]) / (m["tokens"] / m["cpu_seconds"]) for o, m in zip(both["ours"], both["megatron"])]
            entry |= {"megatron_tokens_per_s": [r["tokens_per_s"] for r in both["megatron"]],
                      "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3),
                      "ours_cpu_seconds": [r["cpu_seconds"] for r in both["ours"]],
                      "megatron_cpu_seconds": [r["cpu_seconds"] for r in both["megatron"]],
                      "cpu_ratios": [round(r, 3) for r in cpu_ratios], "median_cpu_ratio": round(statistics.median(cpu_ratios), 3)}
            print(f"workers {workers}: wall tokens/s ratio ours / Megatron-LM median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}) over {len(ratios)} rounds; "
                  f"tokens per CPU second ratio median {statistics.median(cpu_ratios):.2f} "
                  f"(min {min(cpu_ratios):.2f}, max {max(cpu_ratios):.2f})")
        summary["workers"][str(workers)] = entry
    low, high = min(args.workers), max(args.workers)
    if high > low:
        scaling = statistics.median(runs[high]["ours"][i]["tokens_per_s"] for i in range(args.rounds)) / \
            statistics.median(runs[low]["ours"][i]["tokens_per_s"] for i in range(args.rounds))
        summary["scaling"] = {"from": low, "to": high, "ratio": round(scaling, 3)}
        note = "" if os.cpu_count() >= high else f" (only {os.cpu_count()} CPUs: not a scaling figure)"
        print(f"scaling {low} -> {high} workers: {scaling:.2f}x{note}")
    summary["load_after"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
