#!/usr/bin/env bash
# A Table-3-style ablation at tiny scale on CPU: none, uniform 5/10/15, gaussian 5,
# bernoulli 5, symmetric 5 (both pairings); same data, steps and seed. Each run fine-tunes
# the tiny LLaMA, answers held-out prompts, and the comparison writes a table and plots to
# runs/ablation_cpu/results/. ITERS and PROMPTS shorten it (defaults 120 and 20).
# Held-out prompts: AlpacaEval's 805 from ../shared/data when present, else the bundled set.
# A random 1M-parameter model shows the machinery, not the method's effect.
set -euo pipefail
source "$(dirname "$0")/cpu_common.sh"
ITERS=${ITERS:-120}
PROMPTS=${PROMPTS:-20}
run="$root/runs/ablation_cpu"
rm -rf "$run" && mkdir -p "$run/outputs"
prepare_cpu_run "$run"
prompts="$root/../shared/data/alpaca_eval_text_davinci_003.json"
[ -f "$prompts" ] || prompts="$root/symnoise_megatron/data/bundled/instructions.json"
compare=()
for setting in none:0 uniform:5 uniform:10 uniform:15 gaussian:5 bernoulli:5 symmetric:5:concat symmetric:5:microbatch; do
  IFS=: read -r kind alpha pairing <<< "$setting"
  name="${kind}${alpha#0}${pairing:+_$pairing}"
  echo "== $name"
  $torchrun --standalone --nproc-per-node 2 -m symnoise_megatron.finetune $(cpu_finetune_args "$run" "$ITERS") \
      --save "$run/$name" --noise-kind "$kind" --noise-alpha "${alpha}" --noise-pairing "${pairing:-concat}" \
      2>&1 | tee "$run/$name.log" | grep -E "iteration|validation" || true
  $py tools/generate.py --megatron-dir "$run/$name" --prompts "$prompts" --limit "$PROMPTS" \
      --output "$run/outputs/$name.json" --max-new-tokens 64 --no-progress
  compare+=(--run "$name=$run/$name.log:$run/outputs/$name.json")
done
$py tools/text_metrics.py "$run"/outputs/*.json --dataset alpaca
$py tools/compare_runs.py "${compare[@]}" --output-dir "$run/results" --dataset alpaca
