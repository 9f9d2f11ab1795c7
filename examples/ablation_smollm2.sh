#!/usr/bin/env bash
# A small real ablation in the spirit of SymNoise's Table 3, on the pretrained SmolLM2-135M-Instruct,
# on CPU: none, uniform 5, gaussian 5, bernoulli 5, symmetric 5 (both pairings), each with SEEDS
# (data order and noise seed), same data, steps and hyperparameters otherwise.
#
# Data: the bundled instructions plus, when ../shared/data holds it, AlpacaEval's 805
# text-davinci-003 answers, of which HELD_OUT rows are set aside (seeded). The validation loss
# (no noise) is measured on the held-out rows, and PROMPTS held-out prompts are answered greedily;
# tools/compare_runs.py tabulates mean and spread over seeds and says which differences exceed
# the seeds' spread, and gives rep-2 and log-diversity under both definitions of
# tools/text_metrics.py (paper, as the published Table 4 computed them; standard, corrected).
# Results: runs/ablation_smollm2/results/ (table.md, loss.png, responses.png).
#
#   bash examples/ablation_smollm2.sh                   # the committed run (examples/results/ablation_smollm2/)
#   ITERS=4 SEEDS="1" PROMPTS=2 bash examples/ablation_smollm2.sh   # a quick check of the machinery
set -euo pipefail
source "$(dirname "$0")/cpu_common.sh"
ITERS=${ITERS:-16}
SEEDS=${SEEDS:-"1 2 3"}
PROMPTS=${PROMPTS:-12}
HELD_OUT=${HELD_OUT:-100}
WORDS=${WORDS:-16}  # the answers (64 new tokens) average 25 words: K=16 counts about 2 in 3
run="$root/runs/ablation_smollm2"
mkdir -p "$run/outputs" "$run/logs" "$run/splits"

alpaca_eval="$root/../shared/data/alpaca_eval_text_davinci_003.json"
if [ -f "$alpaca_eval" ]; then
  $py tools/split_records.py --input "$alpaca_eval" --held-out "$HELD_OUT" --seed 0 \
      --train-output "$run/splits/alpaca_eval_train.json" --held-out-output "$run/splits/held_out.json"
  train_inputs=("$bundled" "$run/splits/alpaca_eval_train.json")
else
  echo "(no $alpaca_eval: holding out 32 bundled rows instead)"
  $py tools/split_records.py --input "$bundled" --held-out 32 --seed 0 \
      --train-output "$run/splits/bundled_train.json" --held-out-output "$run/splits/held_out.json"
  train_inputs=("$run/splits/bundled_train.json")
fi
prepare_smollm2_run "$run" train "${train_inputs[@]}"
prepare_smollm2_run "$run" held_out "$run/splits/held_out.json"

compare=()
for seed in $SEEDS; do
  for setting in none:0 uniform:5 gaussian:5 bernoulli:5 symmetric:5:concat symmetric:5:microbatch; do
    IFS=: read -r kind alpha pairing <<< "$setting"
    name="${kind}${alpha#0}${pairing:+_$pairing}"
    log="$run/logs/$name.seed$seed.log" outputs="$run/outputs/$name.seed$seed.json"
    compare+=(--run "$name=$log:$outputs")
    if [ -f "$outputs" ] && [ "$(grep -c '"instruction"' "$outputs")" -ge "$PROMPTS" ]; then
      echo "== $name seed $seed: done"; continue
    fi
    echo "== $name seed $seed"
    checkpoint="$run/checkpoints/$name.seed$seed"
    $torchrun --standalone --nproc-per-node 1 -m symnoise_megatron.finetune \
        --load "$run/smollm2-megatron" --finetune --data-path "$run/data/train" --valid-data-path "$run/data/held_out" \
        --micro-batch-size 2 --global-batch-size 8 --seq-length 256 --pack-sequences \
        --train-iters "$ITERS" --lr 2e-5 --min-lr 2e-6 --lr-warmup-fraction 0.1 --log-interval 1 \
        --eval-interval $(( ITERS / 2 > 0 ? ITERS / 2 : 1 )) --eval-iters 4 --seed "$seed" --noise-seed "$seed" \
        --noise-kind "$kind" --noise-alpha "$alpha" --noise-pairing "${pairing:-concat}" --save "$checkpoint" \
        > "$log" 2>&1 || { tail -20 "$log"; exit 1; }
    grep -E "validation loss" "$log" || true
    $py tools/generate.py --megatron-dir "$checkpoint" --prompt-template chatml --prompts "$run/splits/held_out.json" \
        --limit "$PROMPTS" --output "$outputs" --generator-name "$name.seed$seed" --max-new-tokens 64 --no-progress
    rm -rf "$checkpoint"  # 1.6 GB each with the optimizer; the log and the answers are what the table needs
  done
done
$py tools/compare_runs.py "${compare[@]}" --output-dir "$run/results" --words "$WORDS"
