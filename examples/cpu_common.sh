# Shared by the CPU examples: set up .venv, then
#   smollm2_hf                 prints the SmolLM2-135M-Instruct Hugging Face directory (made once, cached)
#   prepare_smollm2_run DIR    DIR/smollm2-megatron (converted) and DIR/data/PREFIX from instruction files
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
py="$root/.venv/bin/python"
torchrun="$root/.venv/bin/torchrun"
cd "$root"
bundled="$root/symnoise_megatron/data/bundled/instructions.json"

smollm2_hf() {
  $py tools/materialize_model.py --model smollm2-135m-instruct --no-progress
}

# prepare_smollm2_run DIR PREFIX INPUT... : preprocess INPUTs with SmolLM2's tokenizer and ChatML
# into DIR/data/PREFIX (rows without a response are skipped and counted: AlpacaEval has two), and convert SmolLM2 to a megatron-core checkpoint in DIR/smollm2-megatron.
prepare_smollm2_run() {
  local run="$1" prefix="$2"; shift 2
  local hf; hf="$(smollm2_hf)"
  echo "== preprocess $* (SmolLM2 tokenizer, ChatML)"
  $py tools/preprocess_data.py --input "$@" --output-prefix "$run/data/$prefix" --tokenizer-dir "$hf" \
      --prompt-template chatml --seq-length 257 --on-error skip --no-progress
  if [ ! -f "$run/smollm2-megatron/latest_checkpointed_iteration.txt" ]; then
    echo "== convert SmolLM2 to a megatron-core checkpoint"
    $py tools/convert_checkpoint.py hf-to-megatron --load-dir "$hf" --save-dir "$run/smollm2-megatron" --no-progress
  fi
}
