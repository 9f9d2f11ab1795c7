# Shared by the CPU examples: set up .venv, then prepare_cpu_run DIR writes DIR/data (the
# bundled set, preprocessed), DIR/tiny-llama-hf and DIR/tiny-llama-megatron (converted).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
py="$root/.venv/bin/python"
torchrun="$root/.venv/bin/torchrun"
cd "$root"

prepare_cpu_run() {
  local run="$1"
  echo "== preprocess the bundled instruction set"
  $py tools/preprocess_data.py --input symnoise_megatron/data/bundled/instructions.json \
      --output-prefix "$run/data/bundled" --tokenizer-model symnoise_megatron/data/bundled/tokenizer.model --no-progress
  echo "== a tiny LLaMA in Hugging Face format, converted to a megatron-core checkpoint"
  $py tools/make_tiny_llama.py --save-dir "$run/tiny-llama-hf"
  $py tools/convert_checkpoint.py hf-to-megatron --load-dir "$run/tiny-llama-hf" --save-dir "$run/tiny-llama-megatron" --no-progress
}

# Fine-tuning flags of the CPU examples: 2 ranks, TP 2, the bundled set.
cpu_finetune_args() {
  local run="$1" iters="$2"
  echo --load "$run/tiny-llama-megatron" --finetune --data-path "$run/data/bundled" \
       --tensor-model-parallel-size 2 --micro-batch-size 4 --global-batch-size 16 --seq-length 256 \
       --train-iters "$iters" --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.05 --log-interval 10 \
       --eval-interval 40 --eval-iters 1
}
