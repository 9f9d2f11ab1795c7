#!/usr/bin/env bash
# The paper's evaluation pipeline end to end on CPU, as a demonstration of the machinery (a 135M
# judge and a 40-question quiz say next to nothing about quality): three short fine-tunes of the
# SmolLM2 ablation (none, uniform 5 = NEFTune, symmetric 5 = SymNoise; one seed), each exported
# to Hugging Face format and
#   - answering PROMPTS held-out AlpacaEval prompts (symnoise-generate),
#   - judged against text-davinci-003's answers to them by SmolLM2-135M-Instruct itself, through
#     alpaca-eval's local decoder (huggingface_local_completions; config written below),
#   - scored on a local multiple-choice task through lm-evaluation-harness
#     (examples/tasks/general_knowledge.yaml, 40 questions, SHOTS-shot),
# each run's results in a run folder (run.json, outputs.json, alpacaeval_*.json, leaderboard.json),
# then symnoise-compare's paper layout over the three folders: runs/evaluate_smollm2/results/.
#
#   bash examples/evaluate_smollm2.sh              # the committed demonstration (examples/results/evaluation_smollm2/)
#   ITERS=2 PROMPTS=2 bash examples/evaluate_smollm2.sh   # a quick check of the machinery
#   REFERENCE=FILE: text-davinci-003's AlpacaEval outputs elsewhere than ../shared/data/
set -euo pipefail
source "$(dirname "$0")/cpu_common.sh"
ITERS=${ITERS:-16}
SEED=${SEED:-1}
PROMPTS=${PROMPTS:-8}
SHOTS=${SHOTS:-3}
HELD_OUT=100
run="$root/runs/evaluate_smollm2"
mkdir -p "$run/logs" "$run/splits" "$run/folders"

alpaca_eval="${REFERENCE:-$root/../shared/data/alpaca_eval_text_davinci_003.json}"
if [ ! -f "$alpaca_eval" ]; then
  echo "needs $alpaca_eval: text-davinci-003's answers to AlpacaEval, the reference the judge compares with" >&2
  exit 1
fi
# The held-out split of examples/ablation_smollm2.sh (same seed): training never sees these prompts.
$py tools/split_records.py --input "$alpaca_eval" --held-out "$HELD_OUT" --seed 0 \
    --train-output "$run/splits/alpaca_eval_train.json" --held-out-output "$run/splits/held_out.json"
prepare_smollm2_run "$run" train "$bundled" "$run/splits/alpaca_eval_train.json"
hf="$(smollm2_hf)"

# The judge: SmolLM2 through alpaca-eval's local decoder, greedy, a short ChatML pairwise prompt.
judge="$run/judges/smollm2_judge"
mkdir -p "$judge"
cat > "$judge/configs.yaml" <<EOF
smollm2_judge:
  prompt_template: "$root/examples/judges/smollm2_pairwise.txt"
  fn_completions: "huggingface_local_completions"
  completions_kwargs:
    model_name: "$hf"
    max_new_tokens: 6
  completion_parser_kwargs:
    outputs_to_match:
      1: '(?:^|\n) ?Output \(a\)'
      2: '(?:^|\n) ?Output \(b\)'
  batch_size: 1
EOF

folders=()
for setting in none:0 uniform:5 symmetric:5; do
  IFS=: read -r kind alpha <<< "$setting"
  name="${kind}${alpha#0}"
  folder="$run/folders/$name.seed$SEED"
  folders+=(--run-dir "$folder")
  mkdir -p "$folder"
  printf '{"dataset": "bundled + AlpacaEval train split", "model": "SmolLM2-135M-Instruct", "noise": {"kind": "%s", "alpha": %s}, "seed": %s}\n' \
      "$kind" "$alpha" "$SEED" > "$folder/run.json"
  checkpoint="$run/checkpoints/$name.seed$SEED" exported="$run/hf/$name.seed$SEED"
  if [ ! -f "$folder/outputs.json" ] || [ ! -f "$folder/leaderboard.json" ]; then
    if [ ! -f "$exported/config.json" ]; then
      echo "== fine-tune $name seed $SEED ($ITERS steps)"
      $torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune \
          --load "$run/smollm2-megatron" --finetune --data-path "$run/data/train" \
          --micro-batch-size 2 --global-batch-size 8 --seq-length 256 --pack-sequences \
          --train-iters "$ITERS" --lr 2e-5 --min-lr 2e-6 --lr-warmup-fraction 0.1 --log-interval 1 \
          --seed "$SEED" --noise-seed "$SEED" --noise-kind "$kind" --noise-alpha "$alpha" --save "$checkpoint" \
          > "$run/logs/$name.seed$SEED.log" 2>&1 || { tail -20 "$run/logs/$name.seed$SEED.log"; exit 1; }
      cp "$run/logs/$name.seed$SEED.log" "$folder/train.log"
      $py tools/convert_checkpoint.py megatron-to-hf --load-dir "$checkpoint" --save-dir "$exported" --overwrite --no-progress
      rm -rf "$checkpoint"
    fi
    echo "== $name: answers"
    $py tools/generate.py --hf-dir "$exported" --prompt-template chatml --prompts "$run/splits/held_out.json" \
        --limit "$PROMPTS" --output "$folder/outputs.json" --generator-name "$name.seed$SEED" \
        --max-new-tokens 64 --no-progress
    echo "== $name: the multiple-choice task"
    $py tools/evaluate.py leaderboard --hf-dir "$exported" --tasks general_knowledge --num-fewshot "$SHOTS" \
        --include-path examples/tasks --output "$folder/leaderboard.json"
  fi
  echo "== $name: judged by SmolLM2"
  $py tools/evaluate.py alpacaeval --model-outputs "$folder/outputs.json" --reference-outputs "$run/splits/held_out.json" \
      --allow-partial --annotator "$judge" --output "$folder/alpacaeval_smollm2_judge.json" \
      --annotations-cache "$run/judges/cache.json"
done
rm -rf "$run/hf"  # 540 MB each; the run folders hold what the tables need
$py tools/compare_runs.py "${folders[@]}" --output-dir "$run/results" --words 16
