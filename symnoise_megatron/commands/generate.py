"""Answer instructions with a checkpoint, prompted with the training template.

  symnoise-generate --hf-dir out-hf --instruction "What is the capital of France?"
  symnoise-generate --megatron-dir runs/x --prompts alpaca_eval.json --output outputs/x.json
  # NEFTune's evaluation protocol: greedy, repetition penalty 1.2
  symnoise-generate --hf-dir out-hf --prompts alpaca_eval.json --output outputs/x.json \\
      --max-new-tokens 1024 --repetition-penalty 1.2 --batch-size 16
  # a 70B on one node of 8 GPUs
  symnoise-generate --hf-dir out-hf-70b --engine vllm --tensor-parallel-size 8 --prompts alpaca_eval.json \\
      --output outputs/x.json --max-new-tokens 1024 --repetition-penalty 1.2

--prompts writes AlpacaEval's model-outputs JSON (instruction, output, generator, dataset),
ready for ``alpaca_eval --model_outputs``, and resumes a partial output file. Beside it,
OUTPUT.meta records the generator (model path, checkpoint iteration for a megatron
directory, template, max new tokens, greedy or sampling with temperature, top-p and seed,
repetition penalty, engine, dtype, and vLLM's tensor parallel size and max model length);
resuming with any of these changed is refused, naming what differs. A megatron checkpoint is
converted to Hugging Face format on the fly (its latest iteration) into --export-dir.

Engines: transformers runs the model in eval mode (no noise is ever applied), --batch-size
prompts at a time with left padding, sorted by length, written back in prompt order; on GPUs
its layers are spread over the visible GPUs (device_map=auto, needs accelerate). vLLM
(--engine vllm; auto picks it when it is installed and a GPU is present) is a thin adapter
for clusters: it batches by itself, --batch-size only sets how many prompts it gets at once.
vLLM is an extra (pip install "symnoise-megatron[vllm]"): each vLLM release requires one
exact torch version, so install it in an environment of its own (a generation job needs
no training stack).
"""

import argparse
import os
import sys

from symnoise_megatron.commands.errors import exits_on_user_error
from symnoise_megatron.data.templates import TEMPLATES
from symnoise_megatron.evaluation.generate import (DTYPES, ENGINES, Decoding, EngineSettings, answered_rows,
                                                   converted_to_hf, generate_file, generator_identity, make_generator,
                                                   model_source, prompt_template_for, read_prompts, resolve_engine)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf-dir", help="a Hugging Face checkpoint directory with its tokenizer")
    model.add_argument("--megatron-dir", help="a megatron checkpoint directory (converted on the fly)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--instruction", action="append", help="answer this (repeat for several)")
    prompts.add_argument("--prompts", help="AlpacaEval prompt file (JSON list with 'instruction'), JSONL or Parquet")
    parser.add_argument("--output", help="with --prompts: the model-outputs JSON to write or resume")
    parser.add_argument("--generator-name", help="the 'generator' field (default: the checkpoint's name)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--prompt-template", choices=list(TEMPLATES),
                        help="the prompt format; default: the one the --megatron-dir checkpoint was fine-tuned with "
                             "(recorded at each save), else alpaca (a converted or Hugging Face model: say which)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default 256 (NEFTune's AlpacaEval runs: 1024)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature > 0 (default 1: off)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="transformers' (CTRL's) penalty on tokens already in the prompt or answer; 1 is none "
                             "(default). NEFTune's evaluation decoded greedily with 1.2")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (set before each batch)")
    parser.add_argument("--batch-size", type=int,
                        help="prompts per generate call (default 1 with transformers, 256 with vllm). Greedy answers "
                             "equal batch 1's unless padding's other float order flips a near-tie; sampled answers "
                             "depend on the batch with transformers")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto (default): vllm when installed and a GPU is present, else transformers")
    parser.add_argument("--dtype", choices=["auto"] + list(DTYPES), default="auto",
                        help="the weights' precision while answering (default auto: bf16 on GPUs, fp32 on CPU)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="vLLM: GPUs per model (default 1). A 70B in bf16 is 140 GB of weights: 8 on a node of "
                             "80 GB GPUs (4 fit the weights but leave little for the KV cache)")
    parser.add_argument("--max-model-len", type=int,
                        help="vLLM: the longest prompt plus answer in tokens (default: the model's "
                             "max_position_embeddings); lower it to leave GPU memory for the KV cache")
    parser.add_argument("--export-dir",
                        help="with --megatron-dir: the folder that holds the temporary Hugging Face conversion "
                             "(removed at the end; default: the system's temporary folder, $TMPDIR). It needs the "
                             "model's size: about 140 GB for a 70B in bf16, more than many nodes' local /tmp")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.prompts and not args.output:
        parser.error("--prompts needs --output")
    if args.instruction and args.output:
        parser.error("--output goes with --prompts (--instruction prints its answers)")
    return args


def engine_settings(args) -> EngineSettings:
    return EngineSettings(resolve_engine(args.engine), args.dtype, args.tensor_parallel_size, args.max_model_len)


def run(args, hf_dir, source):
    settings = engine_settings(args)
    batch_size = args.batch_size or (256 if settings.engine == "vllm" else 1)
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    generator = make_generator(hf_dir, args.prompt_template, args.seed, settings, source)
    if args.instruction:
        answers = generator.answer(args.instruction, decoding.max_new_tokens, decoding.temperature, top_p=decoding.top_p,
                                   repetition_penalty=decoding.repetition_penalty, batch_size=batch_size)
        for instruction, answer in zip(args.instruction, answers):
            print(f"### Instruction: {instruction}\n### Response: {answer}\n")
        return
    name = args.generator_name or os.path.basename(os.path.normpath(args.megatron_dir or args.hf_dir))
    rows = generate_file(generator, args.prompts, args.output, name, decoding.max_new_tokens, decoding.temperature,
                         args.limit, progress=not args.no_progress, top_p=decoding.top_p,
                         repetition_penalty=decoding.repetition_penalty, batch_size=batch_size)
    print(f"wrote {len(rows)} answers to {args.output}")


@exits_on_user_error
def main(argv=None):
    args = parse_args(argv)
    # Settings are checked before a model is loaded or a checkpoint converted.
    decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    settings = engine_settings(args)
    if args.export_dir and not args.megatron_dir:
        raise ValueError("--export-dir goes with --megatron-dir (an --hf-dir is read where it is)")
    source = model_source(args.hf_dir, args.megatron_dir)
    notes = []  # said once the run is known to go ahead: a refused run prints only its error
    args.prompt_template = prompt_template_for(args.prompt_template, args.megatron_dir, warn=notes.append)
    if args.prompts:  # the prompts and a partial output are checked before a model is loaded
        identity = generator_identity(source, args.prompt_template, args.seed, decoding, settings)
        answered_rows(args.output, read_prompts(args.prompts)[:args.limit], args.prompts, identity)
    for note in notes:
        print(note, file=sys.stderr)
    if args.hf_dir:
        run(args, args.hf_dir, source)
    else:
        with converted_to_hf(args.megatron_dir, source, args.export_dir) as hf_dir:
            run(args, hf_dir, source)
    return 0
