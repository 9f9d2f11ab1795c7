"""The fine-tuning job's configuration: sections that validate themselves, Megatron-LM's flag
names, one or more YAML/JSON files, defaults.

Each section is a dataclass whose fields are flags (the flag is the field name with dashes)
and whose field metadata holds the flag's help. ``TrainingConfig`` composes the sections;
``TrainingConfig.from_flags`` builds it from flat flag-named values, as the command line and
the ``--config`` files give them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.data.blend import parse_blend
from symnoise_megatron.model.config import PRESETS
from symnoise_megatron.noise.config import NoiseConfig


# Megatron-LM's --tokenizer-type names -> the kind of tokenizer the data meta records.
TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
                   "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
# megatron-core's selective recomputation modules that a dense LLaMA/OPT layer has.
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
# megatron-core's CUDA graph implementations and the scopes a dense LLaMA/OPT layer has.
CUDA_GRAPH_IMPLS = ("none", "local", "transformer_engine")
CUDA_GRAPH_SCOPES = ("attn", "mlp")


def option(default=None, help: str = "", *, factory=None):
    """A flag: its default and its ``--help`` text (kept with the field)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataOptions:
    """The preprocessed data, how it is split and cut into rows, and the tokenizer checks."""

    data_path: List[str] = option(factory=list, help=(
        "the output prefix of tools/preprocess_data.py, or a weighted blend in Megatron-LM's form W1 PREFIX1 W2 PREFIX2 "
        "... (weights normalised; each prefix drawn in proportion to its weight; several prefixes without weights "
        "are weighted by their sample counts)"))
    split: str = option("98,2", ("train,validation[,test] weights of a seeded shuffle of the samples, as Megatron's; the test part is "
                                  "set aside, neither trained nor validated on (ignored with --valid-data-path)"))
    valid_data_path: List[str] = option(
        factory=list, help="a held-out set (a prefix or a weighted blend, as --data-path) preprocessed with the same "
                           "tokenizer and template: the validation loss comes from it and all of --data-path trains")
    seq_length: int = option(512, "tokens per row; longer samples are cut")
    pack_sequences: bool = option(False, "pack several samples per row (attention and loss never cross samples)")
    tokenizer_model: Optional[str] = option(
        None, "optional check, as Megatron-LM's flag: the data carries its tokenizer (recorded at preprocessing); "
              "a tokenizer file or directory given here must be the same one, or the run stops")
    tokenizer_type: Optional[str] = option(
        None, "optional check: SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer or "
              "HuggingFaceTokenizer must match the kind of tokenizer recorded in the data")
    allow_tokenizer_mismatch: bool = option(
        False, "train although the data was tokenized with another tokenizer than the one in the "
               "checkpoint's hf_assets (default: refuse, naming the differences)")
    override_data_config: bool = option(
        False, "on resume, train on with this run's data (--data-path prefixes, weights or content), --seq-length, "
               "--pack-sequences, --split or --seed although they differ from the checkpoint's record: a warning per "
               "change, recorded in the checkpoint's history (default: refuse, naming each change)")

    def validate(self) -> None:
        parse_blend(self.data_path, "--data-path")
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type!r}: the data can only have been tokenized by one of "
                             f"{', '.join(TOKENIZER_TYPES)} (this fine-tune reads the tokenizer recorded in the data)")
        if self.valid_data_path:
            parse_blend(self.valid_data_path, "--valid-data-path")

    def check_paths(self) -> None:
        for flag, prefixes in (("--data-path", self.data_path), ("--valid-data-path", self.valid_data_path)):
            for prefix in [entry.prefix for entry in parse_blend(prefixes, flag)] if prefixes else []:
                if not os.path.exists(prefix + "_tokens.bin"):
                    raise FileNotFoundError(f"{flag} {prefix}: {prefix}_tokens.bin does not exist")
        if self.tokenizer_model is not None and not os.path.exists(self.tokenizer_model):
            raise FileNotFoundError(f"--tokenizer-model {self.tokenizer_model} does not exist")

    @property
    def split_weights(self) -> List[float]:
        return [float(x) for x in self.split.split(",")]


@dataclass
class ModelOptions:
    """Where the model comes from: a preset, or a checkpoint (--load) that gives shape and weights."""

    model: str = option("tiny", "model preset when not loading a checkpoint")
    num_layers: Optional[int] = option(
        None, "with --model: override the preset's layer count (a 7B-wide model that fits one GPU, a quick trial)")
    load: Optional[str] = option(None, "a megatron checkpoint directory (converted or trained)")
    finetune: bool = option(False, "take only the weights of --load and start at iteration 0")
    make_vocab_size_divisible_by: int = option(128)

    def validate(self) -> None:
        if self.num_layers is not None and (self.load or self.num_layers < 1):
            raise ValueError("--num-layers applies to a --model preset (not --load) and must be positive")
        if self.model not in PRESETS and self.load is None:
            raise ValueError(f"--model {self.model!r} is not a preset ({', '.join(sorted(PRESETS))})")

    def check_paths(self) -> None:
        if self.load and not paths.has_checkpoint(self.load):
            raise paths.missing_checkpoint_error(self.load, paths.TRACKER)


@dataclass
class ParallelismOptions:
    """How the model and the batch are split over the ranks (Megatron-LM's layout flags)."""

    tensor_model_parallel_size: int = option(1)
    pipeline_model_parallel_size: int = option(1)
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(None, "interleaved 1F1B: layers per virtual stage")
    num_virtual_stages_per_pipeline_rank: Optional[int] = option(
        None, "interleaved 1F1B: virtual stages (model chunks) per pipeline rank, instead of "
              "--num-layers-per-virtual-pipeline-stage; the form an uneven split needs")
    sequence_parallel: bool = option(False)
    context_parallel_size: int = option(1)
    use_distributed_optimizer: bool = option(
        False, "shard the optimizer state over the data-parallel ranks (ZeRO-1, megatron-core's DistributedOptimizer); "
        "its checkpoints resume under the same TP/PP with any DP size")
    distributed_timeout_minutes: int = option(
        10, "how long a collective may wait for the slowest rank before the run fails (Megatron-LM's flag): the "
            "process group's timeout and megatron-core's groups'. Raise it where one rank can lag behind the others "
            "for longer, such as a save of a large model to a slow file system")

    # Uneven pipeline splits (Megatron-LM's flags; megatron-core builds them). Default: an equal
    # number of layers per stage. The first stage also holds the embedding and the last the
    # output layer and loss (LLaMA-3's 128K vocabulary: about 1.2 layers' weights, and its
    # logits), so at high PP the end stages set the pace; these move layers off them.
    decoder_first_pipeline_num_layers: Optional[int] = option(
        None, "transformer layers on the first pipeline stage; the stages between the first and the last share "
              "the rest equally (default: every stage an equal share)")
    decoder_last_pipeline_num_layers: Optional[int] = option(
        None, "transformer layers on the last pipeline stage (with --decoder-first-pipeline-num-layers or alone)")
    account_for_embedding_in_pipeline_split: bool = option(
        False, "split the layers as if the embedding were one more layer: the first stage holds one transformer "
               "layer fewer (the layers plus the counted ones must divide by PP x virtual stages)")
    account_for_loss_in_pipeline_split: bool = option(
        False, "split the layers as if the output layer and loss were one more layer: the last stage holds one "
               "transformer layer fewer")

    def validate(self) -> None:
        if self.distributed_timeout_minutes < 1:
            raise ValueError("--distributed-timeout-minutes must be at least 1")
        for flag, value in (("--num-layers-per-virtual-pipeline-stage", self.num_layers_per_virtual_pipeline_stage),
                            ("--num-virtual-stages-per-pipeline-rank", self.num_virtual_stages_per_pipeline_rank)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1")
        if self.num_layers_per_virtual_pipeline_stage and self.num_virtual_stages_per_pipeline_rank:
            raise ValueError("--num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank say "
                             "the same thing two ways: give one")
        uneven = self.decoder_first_pipeline_num_layers is not None or self.decoder_last_pipeline_num_layers is not None
        if uneven and self.num_layers_per_virtual_pipeline_stage:
            # As Megatron-LM: with uneven stages the layers per virtual stage differ between ranks.
            raise ValueError("--decoder-first/last-pipeline-num-layers with interleaving take "
                             "--num-virtual-stages-per-pipeline-rank, not --num-layers-per-virtual-pipeline-stage")
        if self.context_parallel_size > 1:
            # The noise is context-parallel ready (tested), the loop is not: it would feed every
            # CP rank whole sequences. Refused rather than trained wrong.
            raise ValueError("--context-parallel-size > 1 is not supported by the fine-tuning loop yet "
                             "(it does not split sequences across context-parallel ranks)")


@dataclass
class OptimizerOptions:
    """Batch sizes, length of the run, Adam, the learning-rate schedule and what a bad step does.
    Defaults follow NEFTune's Alpaca recipe (lr 5e-5, global batch 128)."""

    micro_batch_size: int = option(1)
    global_batch_size: int = option(128)
    train_iters: Optional[int] = option(None)
    train_epochs: Optional[float] = option(None, "instead of --train-iters: epochs over the train split")
    lr: float = option(5e-5)
    min_lr: float = option(0.0)
    lr_decay_style: str = option("cosine")
    lr_warmup_fraction: float = option(0.03, "fraction of the iterations spent warming up the learning rate")
    weight_decay: float = option(0.0)
    clip_grad: float = option(1.0)
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.999)
    seed: int = option(1234)  # also seeds the initialisation, the train/validation split and the sample order
    skip_nonfinite_loss: bool = option(
        False, "skip the update of a step with a NaN/Inf loss (default: stop, naming the last checkpoint)")
    # resuming with another learning-rate schedule (Megatron-LM's pair of flags; default: refuse)
    override_opt_param_scheduler: bool = option(
        False, "on resume, take this run's learning-rate schedule (--lr, --min-lr, warm-up, "
               "--train-iters) over the checkpoint's (default: refuse a mismatch)")
    use_checkpoint_opt_param_scheduler: bool = option(
        False, "on resume, keep the checkpoint's learning-rate schedule whatever the flags say")

    def validate(self) -> None:
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("give exactly one of --train-iters and --train-epochs")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r} is not constant, linear, cosine or inverse-square-root")


@dataclass
class PrecisionOptions:
    """Number formats and activation memory."""

    bf16: bool = option(False)
    fp8_format: Optional[str] = option(None, "e4m3 or hybrid: FP8 through Transformer Engine (GPU)")
    fp8_recipe: str = option("delayed", "delayed, tensorwise or blockwise scaling (GPU)")
    first_last_layers_bf16: bool = option(
        False, "run the first and last layers in BF16 under FP8 (tensorwise/blockwise recipes); "
               "the start-up check recommends it when FP8 would swallow the noise")
    num_layers_at_start_in_bf16: int = option(1, "with --first-last-layers-bf16: leading layers kept in BF16")
    num_layers_at_end_in_bf16: int = option(1, "with --first-last-layers-bf16: trailing layers kept in BF16")
    fp8_param_gather: bool = option(
        False, "keep the FP8 GEMMs' weights in FP8 (Transformer Engine's FP8 parameters) and all-gather them in FP8 "
               "with the distributed optimizer: half the weight memory and parameter all-gather traffic of BF16 "
               "(needs --fp8-format and --use-distributed-optimizer; GPU)")
    recompute_granularity: Optional[str] = option(
        None, "activation recomputation: full (whole layers, see --recompute-method) or selective (the parts named "
              "by --recompute-modules)")
    recompute_method: Optional[str] = option(
        None, "with --recompute-granularity full: uniform (recompute each group of --recompute-num-layers layers "
              "from its input; default, 1 layer) or block (recompute the first --recompute-num-layers layers of "
              "each model chunk and keep the rest's activations)")
    recompute_num_layers: Optional[int] = option(
        None, "with --recompute-granularity full: layers per recomputed group (uniform; must divide every model "
              "chunk's layers) or layers recomputed per model chunk (block) (default 1)")
    recompute_modules: List[str] = option(
        factory=list, help="with --recompute-granularity selective: any of core_attn (the attention scores; little "
                           "to gain under Transformer Engine's fused attention, which stores none), mlp (the MLP: "
                           "frees its large intermediate activations for one more MLP forward), layernorm (the "
                           "norms; Transformer Engine fuses them into the next linear layer, so it saves nothing "
                           "there) (default: core_attn, as megatron-core)")

    def validate(self) -> None:
        # Whether Transformer Engine is there for the GPU-only settings is checked when the model is built.
        for flag, value, allowed in (("--fp8-format", self.fp8_format, ("e4m3", "hybrid")),
                                     ("--fp8-recipe", self.fp8_recipe, ("delayed", "tensorwise", "blockwise")),
                                     ("--recompute-granularity", self.recompute_granularity, ("full", "selective")),
                                     ("--recompute-method", self.recompute_method, ("uniform", "block"))):
            if value is not None and value not in allowed:
                raise ValueError(f"{flag} {value!r}: use one of {', '.join(allowed)}")
        unknown = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        if unknown:
            raise ValueError(f"--recompute-modules {' '.join(unknown)}: use any of {', '.join(RECOMPUTE_MODULES)} "
                             "(megatron-core's others are for MoE and MLA models)")
        # Megatron-LM's and megatron-core's refusals, each naming the flag.
        full = self.recompute_granularity == "full"
        if self.recompute_method is not None and not full:
            raise ValueError("--recompute-method needs --recompute-granularity full (selective recomputation has no "
                             "method, as in Megatron-LM)")
        if self.recompute_num_layers is not None and (not full or self.recompute_num_layers < 1):
            raise ValueError("--recompute-num-layers needs --recompute-granularity full and must be at least 1")
        if self.recompute_modules and self.recompute_granularity != "selective":
            raise ValueError("--recompute-modules needs --recompute-granularity selective")
        if "layernorm" in self.recompute_modules and self.fp8_format and self.fp8_recipe == "delayed":
            raise ValueError("--recompute-modules layernorm does not work with --fp8-recipe delayed (megatron-core "
                             "refuses it); use tensorwise or blockwise scaling, or leave layernorm out")
        if self.fp8_param_gather and not self.fp8_format:
            raise ValueError("--fp8-param-gather needs --fp8-format")
        if self.first_last_layers_bf16 and self.fp8_format and self.fp8_recipe == "delayed":
            raise ValueError("--first-last-layers-bf16 does not work with --fp8-recipe delayed (megatron-core refuses "
                             "it: 'Delayed scaling does not support first / last layer in BF16'); use --fp8-recipe "
                             "tensorwise or blockwise")

    @property
    def keeps_layers_in_bf16(self) -> bool:
        """Whether --first-last-layers-bf16 keeps any layer out of FP8 (its GEMMs then run in both)."""
        return self.first_last_layers_bf16 and self.num_layers_at_start_in_bf16 + self.num_layers_at_end_in_bf16 > 0

    @property
    def params_dtype(self):
        import torch

        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass
class PerformanceOptions:
    """Communication overlap, fusions and the host's garbage collector (Megatron-LM's performance flags).

    The defaults are Megatron-LM's, except gradient-accumulation fusion (on wherever this stack
    provides the kernel: Transformer Engine's layers fuse it themselves, and megatron-core's own
    output layer gets torch's GEMM where apex is missing) and FP32 gradient accumulation (on,
    which Megatron-LM also turns on under --bf16).
    """

    overlap_grad_reduce: bool = option(
        False, "overlap the data-parallel gradient reduction (all-reduce, or reduce-scatter with the distributed "
               "optimizer) with the backward of the step's last micro-batch, bucket by bucket")
    overlap_param_gather: bool = option(
        False, "with --use-distributed-optimizer and --overlap-grad-reduce: overlap the parameter all-gather after "
               "the optimizer step with the next step's forward (each module waits for its own bucket); weights "
               "are gathered before every save and validation")
    ddp_bucket_size: Optional[int] = option(
        None, "parameters per data-parallel communication bucket (default: megatron-core's, "
              "max(40M, 1M x data-parallel size))")
    accumulate_allreduce_grads_in_fp32: bool = option(
        True, "accumulate gradients over micro-batches in an FP32 buffer and reduce them over the data-parallel "
              "ranks in FP32 (default on, as Megatron-LM does under --bf16; FP32 training has FP32 gradients either "
              "way). Switch it off in a run config ('accumulate_allreduce_grads_in_fp32: false', Megatron-LM's "
              "--grad-reduce-in-bf16) to halve the gradient buffer and its traffic at the cost of BF16 sums, as "
              "Megatron-Bridge's speed recipes do")
    no_gradient_accumulation_fusion: bool = option(
        False, "add each linear layer's weight gradient to the FP32 buffer in a second pass instead of inside its "
               "GEMM (fusion is on by default; Megatron-LM's flag to switch it off)")
    cross_entropy_loss_fusion: bool = option(
        False, "megatron-core's fused vocabulary-parallel cross entropy (GPU)")
    cross_entropy_fusion_impl: str = option(
        "native", "with --cross-entropy-loss-fusion: native (megatron-core's) or te (Transformer Engine's)")
    use_precision_aware_optimizer: bool = option(
        False, "Transformer Engine's FusedAdam keeps the master weights as BF16 weights plus their 16 low bits "
               "(2 bytes a parameter less than an FP32 copy) (needs --use-distributed-optimizer and Transformer "
               "Engine; GPU)")
    manual_gc: bool = option(
        False, "switch Python's garbage collector off and collect at fixed points instead (the start, around "
               "validation, every --manual-gc-interval iterations): every rank collects at the same time, rather "
               "than one rank's collection stalling all of them mid-step")
    manual_gc_interval: int = option(
        0, "with --manual-gc: collect every this many iterations (0: only at the start and around validation)")
    static_shapes: bool = option(
        False, "give the model the same shapes every step: rows of exactly --seq-length (not cut to the step's "
               "longest sample), logits at every position (not at the step's loss tokens), packed rows' thd "
               "max_seqlen fixed at --seq-length. Costs the padding's compute; what --tp-comm-overlap and CUDA "
               "graphs need, and on by default with either (default: off)")
    tp_comm_overlap: bool = option(
        False, "overlap the tensor-parallel all-gathers and reduce-scatters with the GEMMs (Transformer Engine's "
               "userbuffers, sized for --seq-length x the micro-batch's rows at start-up; needs "
               "--sequence-parallel, TP above 1, a GPU; turns on --static-shapes) (default: off)")
    cuda_graph_impl: str = option(
        "none", "none, local (megatron-core's graphs of each layer, captured by the pipeline schedule) or "
                "transformer_engine (Transformer Engine's make_graphed_callables, captured after "
                "--cuda-graph-warmup-steps iterations); a GPU; turns on --static-shapes (default: none)")
    cuda_graph_scope: List[str] = option(
        factory=list, help="with --cuda-graph-impl: what each layer's graph covers, any of attn, mlp (default: the "
                           "whole layer). Packed rows' thd attention cannot be graphed by transformer_engine: give mlp")
    cuda_graph_warmup_steps: int = option(
        3, "with --cuda-graph-impl: iterations run without graphs before they are captured (default: 3, as Megatron-LM)")

    def validate(self) -> None:
        if self.cuda_graph_impl not in CUDA_GRAPH_IMPLS:
            raise ValueError(f"--cuda-graph-impl {self.cuda_graph_impl!r}: use one of {', '.join(CUDA_GRAPH_IMPLS)}")
        unknown_scopes = sorted(set(self.cuda_graph_scope) - set(CUDA_GRAPH_SCOPES))
        if unknown_scopes:
            raise ValueError(f"--cuda-graph-scope {' '.join(unknown_scopes)}: use any of {', '.join(CUDA_GRAPH_SCOPES)} "
                             "(megatron-core's others are for MoE and Mamba layers; full_iteration is not run here)")
        if self.cuda_graph_scope and self.cuda_graph_impl == "none":
            raise ValueError("--cuda-graph-scope needs --cuda-graph-impl local or transformer_engine")
        if self.cuda_graph_warmup_steps < 1:
            raise ValueError("--cuda-graph-warmup-steps must be at least 1")
        if self.ddp_bucket_size is not None and self.ddp_bucket_size < 1:
            raise ValueError("--ddp-bucket-size must be at least 1")
        if self.manual_gc_interval < 0:
            raise ValueError("--manual-gc-interval must be 0 or more")
        if self.manual_gc_interval and not self.manual_gc:
            raise ValueError("--manual-gc-interval needs --manual-gc")
        if self.cross_entropy_fusion_impl not in ("native", "te"):
            raise ValueError(f"--cross-entropy-fusion-impl {self.cross_entropy_fusion_impl!r}: use native or te")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ValueError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")

    @property
    def gradient_accumulation_fusion(self) -> bool:
        return not self.no_gradient_accumulation_fusion

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.cuda_graph_impl != "none"

    @property
    def uses_static_shapes(self) -> bool:
        """--static-shapes, or what needs them: TP communication overlap, CUDA graphs."""
        return self.static_shapes or self.tp_comm_overlap or self.uses_cuda_graphs


@dataclass
class NoiseOptions:
    """The embedding noise (SymNoise, NEFTune and the other kinds)."""

    noise_kind: str = option("symmetric", "none | uniform (NEFTune) | gaussian | bernoulli | symmetric (SymNoise)")
    noise_alpha: float = option(
        5.0, "noise strength; scale = alpha / sqrt(L * d). The paper's alpha for each data set is in its run "
             "config under examples/configs/")
    noise_pairing: str = option(
        "concat", "symmetric copies: concat (doubled micro-batch) or microbatch (consecutive micro-batches)")
    noise_seed: int = option(1234, "seed of the counter-based noise")
    override_noise_config: bool = option(
        False, "on resume, train on with this run's --noise-kind/--noise-alpha/--noise-seed/"
               "--noise-pairing although they differ from the checkpoint's (default: refuse)")

    def validate(self) -> None:
        self.noise_config()

    def noise_config(self) -> NoiseConfig:
        """The model's noise settings (NoiseConfig checks them, naming these flags)."""
        return NoiseConfig(self.noise_kind, self.noise_alpha, self.noise_seed, self.noise_pairing)


@dataclass
class CheckpointOptions:
    """Where and when the run saves, and when it saves and exits early."""

    save: Optional[str] = option(
        None, "checkpoint directory; a checkpoint already there is resumed (after checking its files against the "
              "checksums written at save). One run at a time: a lock file names the run holding it")
    save_interval: Optional[int] = option(None)
    exit_interval: Optional[int] = option(None, "save and exit after this many iterations")
    exit_duration_in_mins: Optional[float] = option(None, "save and exit after this many minutes")
    dist_ckpt_optim_fully_reshardable: bool = option(
        False, "with --use-distributed-optimizer: write its state per parameter (gathered over the data-parallel "
        "ranks at save, slower) so that a resume may change TP and PP too")
    keep_last: Optional[int] = option(
        None, "after each save, once the new checkpoint's files match its manifest, remove the older ones but the "
              "newest N that match theirs (the latest is never removed); unset, every checkpoint is kept")
    keep_every: Optional[int] = option(
        None, "with --keep-last: also keep every checkpoint whose iteration is a multiple of this (milestones)")
    stop_file: Optional[str] = option(
        None, "save and exit after the iteration in which this file appears (rank 0 looks every iteration and "
              "removes it); the SLURM script creates it at the time-limit warning, so the save's grace does not "
              "depend on how long torchrun waits after a signal")

    def validate(self) -> None:
        if self.save_interval and not self.save:
            raise ValueError("--save-interval needs --save")
        for flag, value in (("--keep-last", self.keep_last), ("--keep-every", self.keep_every)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1")
            if value is not None and not self.save:
                raise ValueError(f"{flag} needs --save")
        if self.keep_every is not None and self.keep_last is None:
            raise ValueError("--keep-every names checkpoints to keep besides --keep-last's: give --keep-last too "
                             "(without it every checkpoint is kept)")


@dataclass
class LoggingOptions:
    """The console line, validation, TensorBoard and Weights & Biases."""

    eval_interval: Optional[int] = option(None, "validation loss (no noise) every this many iterations")
    eval_iters: int = option(10)
    log_interval: int = option(10)
    tensorboard_dir: Optional[str] = option(
        None, "write loss, validation loss, learning rate, grad norm, throughput and noise scale here")
    wandb_project: Optional[str] = option(None, "log the same scalars to Weights & Biases (needs wandb installed)")
    wandb_exp_name: Optional[str] = option(None)
    wandb_save_dir: Optional[str] = option(None)

    def validate(self) -> None:
        pass  # whether tensorboard/wandb are installed is checked by the metrics sink at start


@dataclass
class TrainingConfig:
    """Every option of ``python -m symnoise_megatron.finetune``, by section."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    parallelism: ParallelismOptions = field(default_factory=ParallelismOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)
    performance: PerformanceOptions = field(default_factory=PerformanceOptions)
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    logging: LoggingOptions = field(default_factory=LoggingOptions)

    @classmethod
    def from_flags(cls, **flags) -> "TrainingConfig":
        """From flat flag-named values (``seq_length=512, lr=1e-5``); unknown names are refused."""
        unknown = set(flags) - set(FLAG_SECTIONS)
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        by_section: Dict[str, dict] = {name: {} for name in SECTIONS}
        for name, value in flags.items():
            by_section[FLAG_SECTIONS[name]][name] = value
        return cls(**{name: SECTIONS[name](**values) for name, values in by_section.items()})

    def flags(self) -> dict:
        """The flat flag-named values (what ``from_flags`` takes)."""
        return {item.name: getattr(section, item.name) for section in self.sections() for item in fields(section)}

    def sections(self):
        return [getattr(self, name) for name in SECTIONS]

    def validate(self) -> None:
        # The flags first, then the files they name: a wrong flag is reported without touching the disk.
        self.validate_flags()
        self.data.check_paths()
        self.model.check_paths()
        self.check_load_and_save()

    def validate_flags(self) -> None:
        """Every section's own checks, then those across sections; no file is read."""
        for section in self.sections():
            section.validate()
        self.check_performance_combinations()

    def check_performance_combinations(self) -> None:
        """Megatron-LM's refusals of performance flags that need a setting of another section."""
        performance, parallelism = self.performance, self.parallelism
        if performance.tp_comm_overlap and not (parallelism.sequence_parallel and parallelism.tensor_model_parallel_size > 1):
            raise ValueError("--tp-comm-overlap needs --sequence-parallel with --tensor-model-parallel-size above 1 "
                             "(the GEMMs it overlaps are sequence parallelism's all-gathers and reduce-scatters)")
        if performance.uses_cuda_graphs:
            if self.precision.recompute_granularity == "full":
                raise ValueError("--cuda-graph-impl with --recompute-granularity full: megatron-core graphs full "
                                 "recomputation only as a whole-iteration graph, which this trainer does not run")
            if self.data.pack_sequences and "attn" in (performance.cuda_graph_scope or ["attn"]):
                raise ValueError("--cuda-graph-impl cannot graph the attention of --pack-sequences' rows (their thd "
                                 "segments change with every micro-batch's samples): add --cuda-graph-scope mlp")
            if (performance.cuda_graph_impl == "transformer_engine" and self.data.pack_sequences
                    and parallelism.pipeline_model_parallel_size > 1):
                raise ValueError("--cuda-graph-impl transformer_engine captures one graph per micro-batch of a step, "
                                 "and --pack-sequences' steps have as many micro-batches as their rows need: under "
                                 "--pipeline-model-parallel-size above 1 use --cuda-graph-impl local")
        distributed_optimizer = self.parallelism.use_distributed_optimizer
        for flag, asked in (("--overlap-param-gather", self.performance.overlap_param_gather),
                            ("--fp8-param-gather", self.precision.fp8_param_gather),
                            ("--use-precision-aware-optimizer", self.performance.use_precision_aware_optimizer)):
            if asked and not distributed_optimizer:
                raise ValueError(f"{flag} needs --use-distributed-optimizer")

    def check_load_and_save(self) -> None:
        """A run resumes from --save only (Megatron-LM would resume from --load): a --save holding a
        converted checkpoint, or a trained --load that would be ignored, is refused rather than
        training from the wrong start."""
        load, save = self.model.load, self.checkpoint.save
        if paths.has_checkpoint(save) and paths.read_tracker(save) is None:
            raise ValueError(f"--save {save} holds a converted checkpoint (release), not a training run: "
                             f"pass it as --load and --save to a new directory")
        if not load or self.model.finetune or paths.has_checkpoint(save):
            return
        iteration = paths.read_tracker(load)
        if iteration is not None:
            raise ValueError(f"--load {load} is a training run's checkpoint (iteration {iteration}) and a run resumes "
                             f"from --save: pass --finetune to start from its weights at iteration 0, or --save {load} "
                             "to continue that run")


SECTIONS = {item.name: item.default_factory for item in fields(TrainingConfig)}
FLAG_SECTIONS = {item.name: section for section, cls in SECTIONS.items() for item in fields(cls)}
FLAG_FIELDS = {item.name: item for cls in SECTIONS.values() for item in fields(cls)}


def _kind(item) -> str:
    """A flag field's type as written (``Optional[float]``, ``List[str]``, ``bool``...)."""
    return item.type if isinstance(item.type, str) else item.type.__name__


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field: noise_alpha -> --noise-alpha."""
    return "--" + field_name.replace("_", "-")


def _program_name() -> str:
    """How the job was started, for usage lines: symnoise-finetune, or its module name under ``-m``."""
    started_as = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if started_as in ("", "-c", "__main__.py", "finetune.py"):
        return "python -m symnoise_megatron.finetune"
    return started_as


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="Instruction fine-tuning with noisy embeddings (SymNoise) on megatron-core. "
        "Run under torchrun; without a GPU it runs on CPU with gloo.",
    )
    parser.add_argument("--config", nargs="+", action="extend", help="YAML or JSON file whose keys are these flags' names (command line "
                        "wins); with several files, a later file wins over an earlier one, and a later --train-iters "
                        "replaces an earlier --train-epochs (and back)")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__doc__.split(chr(10))[0].rstrip('.')})")
        for item in fields(cls):
            _add_flag(group, item)
    return parser


def _add_flag(group, item) -> None:
    default = item.default if item.default is not item.default_factory else None
    kind = _kind(item)
    text = item.metadata.get("help", "")
    if kind == "bool":
        group.add_argument(flag_name(item.name), action="store_true", default=None, help=text)
    elif "List" in kind:
        group.add_argument(flag_name(item.name), nargs="+", default=None, help=text)
    else:
        caster = int if "int" in kind else float if "float" in kind else str
        # A help text that states its default itself (in words) is not given a second one.
        shown = text if "default" in text else f"{text} (default: {default})".strip()
        group.add_argument(flag_name(item.name), type=caster, default=None, help=shown)


def parse_config(argv=None) -> TrainingConfig:
    """The command line over the ``--config`` files (later files over earlier ones)."""
    args = vars(build_parser().parse_args(argv))
    values = {}
    for source in [load_config_file(path) for path in args.pop("config") or []] + [
            {k: v for k, v in args.items() if v is not None}]:
        for either, other in ALTERNATIVES:  # a later source's choice replaces an earlier one's
            if source.get(either) is not None or source.get(other) is not None:
                values.pop(either, None), values.pop(other, None)
        values.update(source)
    return TrainingConfig.from_flags(**values)


# Flags that say one thing two ways: a run config's 3 epochs give way to --train-iters 20 on the
# command line (or a later file) rather than clash with it.
ALTERNATIVES = [("train_iters", "train_epochs")]


def load_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(handle) or {}
        else:
            data = json.load(handle)
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = set(values) - set(FLAG_SECTIONS)
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)} in {path}")
    return {key: _as_flag_value(path, key, value) for key, value in values.items()}


def _as_flag_value(path: str, key: str, value):
    """A file's value as its flag would parse it (YAML reads 5e-5 as a string, 5 as an int), or an
    error naming the file and the key; null clears an earlier file's value."""
    kind = _kind(FLAG_FIELDS[key])
    if value is None:
        return None
    if "List" in kind:
        value = value if isinstance(value, list) else [value]
        # A blend's weights: YAML reads [0.7, A, 0.3, B] with numbers, the command line as strings.
        if all(isinstance(entry, (str, int, float)) and not isinstance(entry, bool) for entry in value):
            return [str(entry) for entry in value]
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif "int" in kind:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif "float" in kind:
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(value, str):
        return value
    raise ValueError(f"{path}: {key}: {value!r} is not what {flag_name(key)} takes ({kind})")
