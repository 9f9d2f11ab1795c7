# Per-data-set settings shared by the launch scripts. Source with DATASET and NOISE_KIND set.
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
: "${DATASET:=alpaca}"
: "${NOISE_KIND:=symmetric}"
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
