#!/usr/bin/env python
"""Batched generation: prompts per second at batch 1 and batch 8, and whether the greedy
answers are the same token for token.

  nice -n 10 python tools/bench/bench_generate.py --prompts ../shared/data/alpaca_eval_text_davinci_003.json \\
      --count 32 --max-new-tokens 64 --batch-sizes 1 8 --threads 1 --json tools/bench/bench_generate.json

SmolLM2-135M-Instruct (tools/materialize_model.py's directory unless --hf-dir), the ChatML
template, greedy, the first --count AlpacaEval prompts, through the same code path as
tools/generate.py (transformers, left padding, prompts sorted by length). Every batch size
answers the same prompts in one process, one after the other, after a warm-up call.

Where an answer differs from batch 1's, the first differing token is explained: the
model is run on that answer's common prefix alone and with the left padding it had in its
batch, and the report gives both runs' two best tokens and logit margins and the largest
logit difference between them (padding changes the float order of the reductions, so a
near-tie can flip). ``--smallest``: two of the bundled instructions, two new tokens, batches of 1
and 2 (CI runs it; the figures mean nothing).
"""

import argparse
import json
import os
import platform
import sys
import time

import torch

from symnoise_megatron.evaluation.generate import Decoding, Generator
from symnoise_megatron.evaluation.records import read_records


def explain(generator, prompt, batch_prompts, common, batch_token, single_token):
    """Logits at the first differing step: the sequence alone vs with its batch's left padding."""
    sequence = prompt + common
    pad_count = max(len(p) for p in batch_prompts) - len(prompt)
    pad = generator.tokenizer.eos_id
    with torch.no_grad():
        alone = generator.model(torch.tensor([sequence])).logits[0, -1]
        padded = generator.model(torch.tensor([[pad] * pad_count + sequence]),
                                 attention_mask=torch.tensor([[0] * pad_count + [1] * len(sequence)])).logits[0, -1]

    def best_two(logits):
        values, ids = logits.topk(2)
        return {"tokens": [generator.tokenizer.decode([i]) for i in ids.tolist()], "ids": ids.tolist(),
                "margin": float(values[0] - values[1])}

    return {"position": len(common), "batch_1_token": generator.tokenizer.decode([single_token]),
            "batched_token": generator.tokenizer.decode([batch_token]), "left_pads_in_batch": pad_count,
            "alone": best_two(alone), "with_padding": best_two(padded),
            "max_abs_logit_difference": float((alone - padded).abs().max())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", help="default: the materialised SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", help="AlpacaEval's prompt file (required unless --smallest)")
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a loaded shared machine two spinning threads were 7x "
                             "slower per token than one)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smallest", action="store_true", help="two bundled instructions, two new tokens, batches of "
                        "1 and 2 (CI runs it; the figures mean nothing)")
    args = parser.parse_args(argv)
    if args.smallest:
        from symnoise_megatron.data import BUNDLED_INSTRUCTIONS

        args.prompts, args.count, args.max_new_tokens, args.batch_sizes = BUNDLED_INSTRUCTIONS, 2, 2, [1, 2]
    elif not args.prompts:
        parser.error("--prompts is required (AlpacaEval's prompt file)")
    torch.set_num_threads(args.threads)
    hf_dir = args.hf_dir
    if not hf_dir:
        from symnoise_megatron.checkpoint.gguf import materialize

        hf_dir = materialize("smollm2-135m-instruct", progress=False, log=lambda m: print(m, file=sys.stderr))
    generator = Generator(hf_dir, args.template)
    rows = read_records(args.prompts, "instruction")[:args.count]
    prompts = [generator.prompt_ids(r["instruction"], r.get("input", "")) for r in rows]
    decoding = Decoding(args.max_new_tokens, repetition_penalty=args.repetition_penalty)
    generator.answer_ids(prompts[:2], Decoding(4), batch_size=2)  # warm-up: first-call allocations

    results, answers = [], {}
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        answers[batch_size] = generator.answer_ids(prompts, decoding, batch_size)
        seconds = time.perf_counter() - start
        new_tokens = sum(len(a) for a in answers[batch_size])
        results.append({"batch_size": batch_size, "seconds": seconds, "prompts_per_s": len(prompts) / seconds,
                        "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / seconds})
        print(f"batch {batch_size}: {seconds:.1f} s, {len(prompts) / seconds:.3f} prompts/s, "
              f"{new_tokens / seconds:.1f} new tokens/s", flush=True)

    reference = answers[args.batch_sizes[0]]
    comparisons = []
    for batch_size in args.batch_sizes[1:]:
        differing = [i for i, (a, b) in enumerate(zip(answers[batch_size], reference)) if a != b]
        comparison = {"batch_size": batch_size, "identical_answers": len(prompts) - len(differing),
                      "differing_prompts": differing}
        if differing:
            i = differing[0]
            mine, theirs = answers[batch_size][i], reference[i]
            common = next((k for k in range(min(len(mine), len(theirs))) if mine[k] != theirs[k]), min(len(mine), len(theirs)))
            order = sorted(range(len(prompts)), key=lambda j: len(prompts[j]))
            rank = order.index(i)
            batch = [prompts[j] for j in order[rank - rank % batch_size: rank - rank % batch_size + batch_size]]
            eos = generator.tokenizer.eos_id
            comparison["first_difference"] = dict(prompt=i, **explain(
                generator, prompts[i], batch, theirs[:common], mine[common] if common < len(mine) else eos,
                theirs[common] if common < len(theirs) else eos))
        comparisons.append(comparison)
        print(json.dumps(comparison, indent=1, ensure_ascii=False))
    speedup = {f"batch_{r['batch_size']}_vs_{args.batch_sizes[0]}": r["prompts_per_s"] / results[0]["prompts_per_s"]
               for r in results[1:]}
    print(json.dumps(speedup))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": os.path.basename(os.path.normpath(hf_dir)), "prompts": len(prompts),
                       "max_new_tokens": args.max_new_tokens, "repetition_penalty": args.repetition_penalty,
                       "template": args.template, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "machine": platform.processor() or platform.machine(), "load_average_at_end": os.getloadavg(),
                       "runs": results, "speedup": speedup, "comparisons": comparisons}, handle, indent=1, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
