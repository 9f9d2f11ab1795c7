"""The paper's evaluation of a fine-tuned checkpoint, on the harnesses made for it (the eval extra).

  # Figure 1: the Open LLM Leaderboard v1 tasks (lm-evaluation-harness) on an HF checkpoint
  symnoise-evaluate leaderboard --hf-dir out-hf --output runs/x/leaderboard.json
  # Tables 1-3: AlpacaEval win rate of symnoise-generate's answers (alpaca-eval)
  symnoise-evaluate alpacaeval --model-outputs runs/x/outputs.json --annotator alpaca_eval_gpt4 \\
      --output runs/x/alpacaeval_gpt4.json

leaderboard and alpacaeval each explain themselves: symnoise-evaluate leaderboard --help.
"""

import argparse

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.evaluation.alpacaeval import (DEFAULT_ANNOTATOR, DEFAULT_REFERENCE, AlpacaEvalConfig,
                                                     evaluate_outputs)
from symnoise_megatron.evaluation.leaderboard import (DTYPES, OPEN_LLM_LEADERBOARD_V1, LeaderboardConfig, parse_tasks,
                                                      run_leaderboard)

LEADERBOARD_HELP = """The Open LLM Leaderboard tasks on a Hugging Face checkpoint through lm-evaluation-harness.

ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot and TruthfulQA-MC2 0-shot by default
(the set NEFTune and SymNoise report), each task's leaderboard metric with its standard
error, shots and sample count in --output, lm-eval's own results in OUTPUT.lm_eval.json. Resumable: lm-eval's request cache (OUTPUT.lm_eval_cache/) holds every
answered request, per model.
"""
ALPACAEVAL_HELP = """AlpacaEval win rate of one outputs file through alpaca-eval.

The win rate against text-davinci-003's AlpacaEval answers (the paper's
reference; --reference-outputs for another), judged by any of alpaca-eval's evaluator
configs or a config directory of your own (a local judge: fn_completions
huggingface_local_completions). Writes win rate, standard error, length-controlled win rate
(over all 805 instructions), average length and the annotator to --output, the annotations to
OUTPUT.annotations.json; alpaca-eval's annotation cache (alpaca_eval_cache/ beside --output)
makes a rerun free. Refused before anything is judged or written: an annotator that cannot
load, a missing API key, answers whose instructions do not match the reference.
"""
LEADERBOARD_DEFAULT = ", ".join(f"{task} {shots}-shot" for task, shots in OPEN_LLM_LEADERBOARD_V1.items())


def _limit(text: str) -> float:
    value = float(text)
    return int(value) if value >= 1 and value == int(value) else value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    board = commands.add_parser("leaderboard", help="lm-evaluation-harness tasks on an HF checkpoint (Figure 1)",
                                description=LEADERBOARD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    board.add_argument("--hf-dir", required=True, help="a Hugging Face checkpoint (symnoise-convert megatron-to-hf)")
    board.add_argument("--output", required=True, help="the summary JSON (lm-eval's results: OUTPUT.lm_eval.json)")
    board.add_argument("--tasks", help=f"comma-separated lm-eval tasks or groups (default: {LEADERBOARD_DEFAULT})")
    board.add_argument("--num-fewshot", help="shots: N for every task, or TASK=N,... for some (default: the "
                                             "leaderboard's for its tasks, each task's own for others)")
    board.add_argument("--batch-size", help="lm-eval's batch size: a number or auto (default: auto on a GPU, 8 on CPU)")
    board.add_argument("--limit", type=_limit, help="at most N documents per task, or a fraction below 1 (trial runs)")
    board.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    board.add_argument("--dtype", choices=DTYPES, default="auto", help="default auto: bfloat16 on a GPU, float32 on CPU")
    board.add_argument("--include-path", help="a folder of task YAMLs (local data sets, clusters without hub access)")
    board.add_argument("--cache", help="lm-eval's request-cache prefix (default: OUTPUT.lm_eval_cache/requests_MODELID)")

    judge = commands.add_parser("alpacaeval", help="AlpacaEval win rate of an outputs file (Tables 1-3)",
                                description=ALPACAEVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    judge.add_argument("--model-outputs", required=True, help="symnoise-generate's AlpacaEval model-outputs JSON")
    judge.add_argument("--output", required=True, help="the results JSON (annotations: OUTPUT.annotations.json)")
    judge.add_argument("--reference-outputs",
                       help=f"outputs to compare with (default: {DEFAULT_REFERENCE}, fetched from the Hugging Face hub "
                            "once, the reference alpaca-eval's AlpacaEval 1 uses)")
    judge.add_argument("--annotator", default=DEFAULT_ANNOTATOR,
                       help=f"an alpaca-eval evaluator config (default {DEFAULT_ANNOTATOR}: GPT-4, the paper's Table 1; "
                            "chatgpt: Tables 2-3; weighted_alpaca_eval_vllm_llama3_70b: a local vLLM server) or a "
                            "config directory")
    judge.add_argument("--annotations-cache", help="alpaca-eval's annotation cache (default: "
                                                   "alpaca_eval_cache/ANNOTATOR.json beside --output)")
    judge.add_argument("--allow-partial", action="store_true",
                       help="judge only the reference instructions the outputs answer (default: refuse outputs that "
                            "answer part of the reference: that is not AlpacaEval's win rate)")
    return parser.parse_args(argv)


def _show(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.command == "leaderboard":
        config = LeaderboardConfig(hf_dir=args.hf_dir, output=args.output, tasks=parse_tasks(args.tasks, args.num_fewshot),
                                   batch_size=args.batch_size, limit=args.limit, device=args.device,
                                   include_path=args.include_path, dtype=args.dtype, cache=args.cache)
        summary = run_leaderboard(config)
        for task, row in summary["tasks"].items():
            print(f"{task}: {row['metric']} {_show(row['value'], 4)} ± {_show(row['stderr'], 4)} "
                  f"({row['num_fewshot']}-shot, {row['samples']} samples)")
        print(f"wrote {args.output} and {summary['lm_eval_results']}")
        return 0
    results = evaluate_outputs(AlpacaEvalConfig(
        model_outputs=args.model_outputs, output=args.output, reference_outputs=args.reference_outputs,
        annotator=args.annotator, annotations_cache=args.annotations_cache, allow_partial=args.allow_partial))
    print(f"{results['generator']} vs {results['reference_generator']} ({results['annotator']}, "
          f"{results['instructions']} instructions): win rate {_show(results['win_rate'])} ± "
          f"{_show(results['standard_error'])}, length-controlled "
          f"{_show(results['length_controlled_win_rate'])}, average length {results['avg_length']:.0f} characters")
    if results["unparsed"]:
        print(f"note: {results['unparsed']} judgements could not be parsed into a preference and are left out of the "
              f"win rate (see {results['annotations']})")
    if results["length_controlled_note"]:
        print(f"no length-controlled win rate: {results['length_controlled_note']}")
    print(f"wrote {args.output} and {results['annotations']}")
    return 0
