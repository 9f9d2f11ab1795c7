#!/usr/bin/env bash
# A guard for refactorings that must not change behaviour: short fine-tunes of a tiny random
# LLaMA on the bundled data under several layouts and noise settings (TP 2, PP 2, interleaved PP,
# DP 2 with and without the distributed optimizer, both pairings, packed rows); prints each run's
# per-iteration numbers (loss, grad norm, learning rate, consumed samples, validation loss) and
# the SHA-256 of the final weights exported to Hugging Face. Run it in a checkout of the old and
# of the new code and diff the two outputs: they must be identical (about 3 minutes each on 2 cores).
#   bash tools/trajectory_guard.sh /tmp/old_run > old.txt      # in the old checkout
#   bash tools/trajectory_guard.sh /tmp/new_run > new.txt      # in the new one
#   diff old.txt new.txt
set -euo pipefail
out="$1"; rm -rf "$out"; mkdir -p "$out"
export PYTHONPATH="$PWD" OMP_NUM_THREADS=1
py="$PWD/.venv/bin/python"; torchrun="$PWD/.venv/bin/torchrun"
$py tools/make_tiny_llama.py --save-dir "$out/hf" > /dev/null
$py tools/convert_checkpoint.py hf-to-megatron --load-dir "$out/hf" --save-dir "$out/megatron" --no-progress > /dev/null
$py tools/preprocess_data.py --input symnoise_megatron/data/bundled/instructions.json --output-prefix "$out/data/bundled" \
    --tokenizer-dir "$out/hf" --seq-length 128 --no-progress > /dev/null 2>&1
run() {  # name nproc flags...
  local name="$1" nproc="$2"; shift 2
  $torchrun --standalone --nproc-per-node "$nproc" -m symnoise_megatron.finetune \
      --load "$out/megatron" --finetune --data-path "$out/data/bundled" --seq-length 128 \
      --global-batch-size 8 --train-iters 6 --lr 1e-3 --min-lr 1e-4 --lr-warmup-fraction 0.2 \
      --log-interval 1 --eval-interval 3 --eval-iters 2 "$@" > "$out/$name.log" 2>&1 \
      || { tail -30 "$out/$name.log"; exit 1; }
  echo "== $name"
  grep -oE "iteration +[0-9]+/|consumed samples: +[0-9]+|learning rate: [^|]*|lm loss: [^|]*|grad norm: [^|]*|validation loss at iteration [0-9]+ \| lm loss value: [^|]*" "$out/$name.log" | tr -s ' ' | paste -sd' ' | sed 's/ iteration /\niteration /g'
  [ -d "$out/ckpt-$name" ] || return 0
  $py tools/convert_checkpoint.py megatron-to-hf --load-dir "$out/ckpt-$name" --save-dir "$out/hf-$name" --no-progress > /dev/null
  (cd "$out/hf-$name" && sha256sum *.safetensors)
}
run symmetric_concat_tp1 1 --micro-batch-size 2 --noise-kind symmetric --noise-alpha 5 --save "$out/ckpt-symmetric_concat_tp1"
run symmetric_microbatch_tp2 2 --tensor-model-parallel-size 2 --micro-batch-size 2 --noise-kind symmetric --noise-pairing microbatch --pack-sequences --save "$out/ckpt-symmetric_microbatch_tp2"
run uniform_pp2 2 --pipeline-model-parallel-size 2 --micro-batch-size 1 --noise-kind uniform --noise-alpha 5 --save "$out/ckpt-uniform_pp2"
run gaussian_dp2 2 --micro-batch-size 2 --noise-kind gaussian --noise-alpha 10 --split 90,10 --save "$out/ckpt-gaussian_dp2"
run bernoulli_dp2_distopt_nosave 2 --micro-batch-size 2 --use-distributed-optimizer --noise-kind bernoulli --noise-alpha 5
run none_vpp 2 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1 --micro-batch-size 1 --noise-kind none --pack-sequences --save "$out/ckpt-none_vpp"
