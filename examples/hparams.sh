# Settings shared by the launch scripts: per data set (DATASET, NOISE_KIND) and per hardware
# preset (PRESET). Source it with those set; NNODES is the number of nodes (default 1).
#
# Where each value comes from:
# - lr 5e-5, global batch 128, sequence 512, 3 epochs, cosine decay with 3% warm-up, no
#   weight decay: NEFTune's Alpaca recipe (Jain et al. 2023), which the SymNoise paper
#   (Yadav & Singh 2023) follows; check the paper's appendix before quoting a run as a
#   reproduction.
# - alpha per data set: SymNoise's Table 4 (Alpaca 5, Evol-Instruct 5, ShareGPT 10,
#   OpenPlatypus 15); Table 3 also reports alpha 5, 10 and 15.
# - templates: Alpaca for every set but ShareGPT, which uses Vicuna v1.1 (chosen at
#   preprocessing, tools/preprocess_data.py).
# - layouts: tools/plan_layout.py's recommendations (tests/runtime/test_layout_planner.py
#   keeps the 70B ones in step).
: "${DATASET:=alpaca}"
: "${NOISE_KIND:=symmetric}"
: "${PRESET:=llama2-7b}"
: "${NNODES:=1}"
case "$DATASET" in
  alpaca|evol_instruct) NOISE_ALPHA=${NOISE_ALPHA:-5} ;;
  sharegpt)             NOISE_ALPHA=${NOISE_ALPHA:-10} ;;
  open_platypus)        NOISE_ALPHA=${NOISE_ALPHA:-15} ;;
  *) echo "unknown DATASET $DATASET (alpaca, evol_instruct, sharegpt, open_platypus)" >&2; exit 2 ;;
esac
case "$NOISE_KIND" in
  none|uniform|gaussian|bernoulli|symmetric) ;;
  *) echo "unknown NOISE_KIND $NOISE_KIND" >&2; exit 2 ;;
esac
TRAIN_ARGS=(
  --seq-length 512 --global-batch-size 128 --train-epochs 3
  --lr 5e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.03 --weight-decay 0 --clip-grad 1.0
  --noise-kind "$NOISE_KIND" --noise-alpha "$NOISE_ALPHA" --noise-seed 1234
  --log-interval 10 --eval-interval 100 --eval-iters 10 --save-interval 200
)
# Per preset: processes (GPUs) per node, precision, layout. NPROC_PER_NODE and PRECISION
# ("" for FP32) override the preset's; flags given to the launch script come last and win.
case "$PRESET" in
  llama2-7b)  # 8 H100 per node: TP 2 x DP 4 on one node, micro-batch 4, BF16, concat pairing
    NPROC_PER_NODE=${NPROC_PER_NODE:-8}
    PRECISION=${PRECISION---bf16 --use-distributed-optimizer}
    MODEL_ARGS=(--tensor-model-parallel-size 2 --micro-batch-size 4 --noise-pairing concat)
    ;;
  llama2-70b-fp8)  # 8 H100 per node, FP8 (hybrid, delayed scaling) through Transformer Engine,
    # selective recomputation, micro-batch 1; the symmetric pair as consecutive micro-batches,
    # so activation memory stays that of micro-batch 1. With global batch 128 each replica runs
    # 128 micro-batches per step (with the pairing): the 1F1B bubble (PP-1)/micro-batches is
    # about 12%. Estimates, not measurements: check the first iterations' memory and time.
    #   python tools/plan_layout.py --model llama2-70b --gpus 64 --fp8 --pairing microbatch    # TP 2 x PP 16 x DP 2
    #   python tools/plan_layout.py --model llama2-70b --gpus 128 --fp8 --pairing microbatch   # TP 4 x PP 16 x DP 2
    case "$NNODES" in
      8)  TP=2 PP=16 ;;
      16) TP=4 PP=16 ;;
      *) echo "PRESET=llama2-70b-fp8 runs on 8 or 16 nodes of 8 GPUs; plan a layout for $NNODES nodes with tools/plan_layout.py and add it here" >&2; exit 2 ;;
    esac
    NPROC_PER_NODE=${NPROC_PER_NODE:-8}
    PRECISION=${PRECISION---bf16 --fp8-format hybrid --fp8-recipe delayed --use-distributed-optimizer}
    MODEL_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel
                --micro-batch-size 1 --recompute-granularity selective --noise-pairing microbatch)
    ;;
  cpu)  # no GPU: gloo, FP32, one process per node and one pipeline stage per process (TP 1);
    # a small recipe for a tiny model (tools/make_tiny_llama.py) and the bundled data. tests/slurm
    # runs the SLURM jobs with it; the same flags launched by plain torchrun give the same losses.
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
    PRECISION=${PRECISION-}
    MODEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size "$((NNODES * NPROC_PER_NODE))"
                --micro-batch-size 1 --noise-pairing concat)
    TRAIN_ARGS=(
      --seq-length 128 --global-batch-size 4 --train-iters "${ITERS:-8}"
      --lr 2e-3 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0 --weight-decay 0 --clip-grad 1.0
      --noise-kind "$NOISE_KIND" --noise-alpha "$NOISE_ALPHA" --noise-seed 1234
      --log-interval 1 --save-interval "${SAVE_INTERVAL:-2}"
    )
    ;;
  *) echo "unknown PRESET $PRESET (llama2-7b, llama2-70b-fp8, cpu)" >&2; exit 2 ;;
esac
