"""The fine-tuning job's configuration: Megatron-LM's flag names, a YAML/JSON file, defaults."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, fields
from typing import List, Optional

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.model.config import PRESETS
from symnoise_megatron.noise.config import NOISE_KINDS, PAIRINGS


# Megatron-LM's --tokenizer-type names -> the kind of tokenizer the data meta records.
TOKENIZER_TYPES = {"SentencePieceTokenizer": "sentencepiece", "GPTSentencePieceTokenizer": "sentencepiece",
                   "Llama2Tokenizer": "sentencepiece", "HuggingFaceTokenizer": "huggingface"}


@dataclass
class TrainingConfig:
    """Every option of ``python -m symnoise_megatron.finetune``; the flag is the field name
    with dashes. Defaults follow NEFTune's Alpaca recipe where one applies (lr 5e-5, global
    batch 128, sequence 512)."""

    # data
    data_path: List[str] = field(default_factory=list)  # one preprocessed prefix (PREFIX_tokens.bin ...)
    split: str = "98,2"                # train,validation weights of a seeded shuffle
    valid_data_path: List[str] = field(default_factory=list)  # a held-out prefix; then all of --data-path trains
    seq_length: int = 512
    pack_sequences: bool = False       # several samples per row; attention and loss never cross them
    tokenizer_model: Optional[str] = None  # Megatron-LM's flag: only checked against the data's recorded tokenizer
    tokenizer_type: Optional[str] = None   # likewise
    allow_tokenizer_mismatch: bool = False  # train although the data's tokenizer differs from the checkpoint's
    # model
    model: str = "tiny"                # a preset; with --load the shape comes from the checkpoint
    num_layers: Optional[int] = None   # with --model: the preset with this many layers
    load: Optional[str] = None
    finetune: bool = False             # --load gives weights only, from iteration 0 (a checkpoint in --save still resumes)
    make_vocab_size_divisible_by: int = 128
    # parallelism
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    dist_ckpt_optim_fully_reshardable: bool = False  # distributed optimizer: checkpoints that resume under any TP/PP
    # optimisation
    micro_batch_size: int = 1
    global_batch_size: int = 128
    train_iters: Optional[int] = None
    train_epochs: Optional[float] = None
    lr: float = 5e-5
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_fraction: float = 0.03
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    seed: int = 1234
    # precision and memory
    bf16: bool = False
    fp8_format: Optional[str] = None   # e4m3 | hybrid (GPU, Transformer Engine)
    fp8_recipe: str = "delayed"
    first_last_layers_bf16: bool = False  # keep the layers below out of FP8 (not with the delayed recipe)
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    recompute_granularity: Optional[str] = None  # full | selective
    # noise
    noise_kind: str = "symmetric"
    noise_alpha: float = 5.0
    noise_pairing: str = "concat"
    noise_seed: int = 1234
    override_noise_config: bool = False  # resume with noise settings other than the checkpoint's
    # checkpoints, evaluation, logging
    save: Optional[str] = None
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    skip_nonfinite_loss: bool = False  # skip the update of a step whose loss is NaN/Inf instead of stopping
    # resuming with another learning-rate schedule (Megatron-LM's pair of flags; default: refuse)
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False

    def validate(self) -> None:
        if not self.data_path:
            raise ValueError("--data-path is required")
        if self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler:
            raise ValueError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
        if self.context_parallel_size > 1:
            # The noise is context-parallel ready (tested), the loop is not: it would feed every
            # CP rank whole sequences. Refused rather than trained wrong.
            raise ValueError("--context-parallel-size > 1 is not supported by the fine-tuning loop yet "
                             "(it does not split sequences across context-parallel ranks)")
        if len(self.data_path) != 1:
            raise ValueError("--data-path takes one preprocessed prefix; concatenate inputs at preprocessing")
        if (self.train_iters is None) == (self.train_epochs is None):
            raise ValueError("give exactly one of --train-iters and --train-epochs")
        if self.num_layers is not None and (self.load or self.num_layers < 1):
            raise ValueError("--num-layers applies to a --model preset (not --load) and must be positive")
        if self.model not in PRESETS and self.load is None:
            raise ValueError(f"--model {self.model!r} is not a preset ({', '.join(sorted(PRESETS))})")
        if self.noise_kind not in NOISE_KINDS or self.noise_pairing not in PAIRINGS:
            raise ValueError(f"--noise-kind must be one of {NOISE_KINDS} and --noise-pairing one of {PAIRINGS}")
        if self.lr_decay_style not in ("constant", "linear", "cosine", "inverse-square-root"):
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r} is not constant, linear, cosine or inverse-square-root")
        if self.tokenizer_type is not None and self.tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"--tokenizer-type {self.tokenizer_type!r}: the data can only have been tokenized by one of "
                             f"{', '.join(TOKENIZER_TYPES)} (this fine-tune reads the tokenizer recorded in the data)")
        if self.save_interval and not self.save:
            raise ValueError("--save-interval needs --save")
        if len(self.valid_data_path) > 1:
            raise ValueError("--valid-data-path takes one preprocessed prefix")
        for flag, prefixes in (("--data-path", self.data_path), ("--valid-data-path", self.valid_data_path)):
            for prefix in prefixes:
                if not os.path.exists(prefix + "_tokens.bin"):
                    raise FileNotFoundError(f"{flag} {prefix}: {prefix}_tokens.bin does not exist")
        if self.load and not paths.has_checkpoint(self.load):
            raise paths.missing_checkpoint_error(self.load, paths.TRACKER)
        if self.tokenizer_model is not None and not os.path.exists(self.tokenizer_model):
            raise FileNotFoundError(f"--tokenizer-model {self.tokenizer_model} does not exist")

    @property
    def split_weights(self) -> List[float]:
        return [float(x) for x in self.split.split(",")]


HELP = {
    "data_path": "the output prefix of tools/preprocess_data.py",
    "split": "train,validation weights of a seeded shuffle of the samples (ignored with --valid-data-path)",
    "valid_data_path": "a held-out set preprocessed with the same tokenizer and template: the validation loss "
                       "comes from it and all of --data-path trains",
    "seq_length": "tokens per row; longer samples are cut",
    "pack_sequences": "pack several samples per row (attention and loss never cross samples)",
    "tokenizer_model": "optional check, as Megatron-LM's flag: the data carries its tokenizer (recorded at preprocessing); "
                       "a tokenizer file or directory given here must be the same one, or the run stops",
    "tokenizer_type": "optional check: SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer or "
                      "HuggingFaceTokenizer must match the kind of tokenizer recorded in the data",
    "allow_tokenizer_mismatch": "train although the data was tokenized with another tokenizer than the one in the "
                                "checkpoint's hf_assets (default: refuse, naming the differences)",
    "model": "model preset when not loading a checkpoint",
    "num_layers": "with --model: override the preset's layer count (a 7B-wide model that fits one GPU, a quick trial)",
    "load": "a megatron checkpoint directory (converted or trained)",
    "finetune": "take only the weights of --load and start at iteration 0",
    "num_layers_per_virtual_pipeline_stage": "interleaved 1F1B: layers per virtual stage",
    "use_distributed_optimizer": "shard the optimizer state over the data-parallel ranks (ZeRO-1, megatron-core's "
                                 "DistributedOptimizer); its checkpoints resume under the same TP/PP with any DP size",
    "dist_ckpt_optim_fully_reshardable": "with --use-distributed-optimizer: write its state per parameter (gathered over "
                                         "the data-parallel ranks at save, slower) so that a resume may change TP and PP too",
    "train_epochs": "instead of --train-iters: epochs over the train split",
    "lr_warmup_fraction": "fraction of the iterations spent warming up the learning rate",
    "fp8_format": "e4m3 or hybrid: FP8 through Transformer Engine (GPU)",
    "fp8_recipe": "delayed, tensorwise or blockwise scaling (GPU)",
    "first_last_layers_bf16": "run the first and last layers in BF16 under FP8 (tensorwise/blockwise recipes); "
                              "the start-up check recommends it when FP8 would swallow the noise",
    "num_layers_at_start_in_bf16": "with --first-last-layers-bf16: leading layers kept in BF16",
    "num_layers_at_end_in_bf16": "with --first-last-layers-bf16: trailing layers kept in BF16",
    "recompute_granularity": "full or selective activation recomputation",
    "noise_kind": "none | uniform (NEFTune) | gaussian | bernoulli | symmetric (SymNoise)",
    "noise_alpha": "noise strength; scale = alpha / sqrt(L * d). Paper: Alpaca 5, Evol-Instruct 5, ShareGPT 10, OpenPlatypus 15",
    "noise_pairing": "symmetric copies: concat (doubled micro-batch) or microbatch (consecutive micro-batches)",
    "noise_seed": "seed of the counter-based noise",
    "override_noise_config": "on resume, train on with this run's --noise-kind/--noise-alpha/--noise-seed/"
                             "--noise-pairing although they differ from the checkpoint's (default: refuse)",
    "save": "checkpoint directory; a checkpoint already there is resumed (after checking its files against the "
            "checksums written at save). One run at a time: a lock file names the run holding it",
    "exit_interval": "save and exit after this many iterations",
    "exit_duration_in_mins": "save and exit after this many minutes",
    "eval_interval": "validation loss (no noise) every this many iterations",
    "tensorboard_dir": "write loss, validation loss, learning rate, grad norm, throughput and noise scale here",
    "wandb_project": "log the same scalars to Weights & Biases (needs wandb installed)",
    "skip_nonfinite_loss": "skip the update of a step with a NaN/Inf loss (default: stop, naming the last checkpoint)",
    "override_opt_param_scheduler": "on resume, take this run's learning-rate schedule (--lr, --min-lr, warm-up, "
                                    "--train-iters) over the checkpoint's (default: refuse a mismatch)",
    "use_checkpoint_opt_param_scheduler": "on resume, keep the checkpoint's learning-rate schedule whatever the flags say",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m symnoise_megatron.finetune",
        description="Instruction fine-tuning with noisy embeddings (SymNoise) on megatron-core. "
        "Run under torchrun; without a GPU it runs on CPU with gloo.",
    )
    parser.add_argument("--config", nargs="+", help="YAML or JSON files whose keys are these flags' names "
                        "(later files win, the command line wins over all)")
    for item in fields(TrainingConfig):
        default = item.default if item.default is not item.default_factory else None
        kind = item.type if isinstance(item.type, str) else item.type.__name__
        text = HELP.get(item.name, "")
        if kind == "bool":
            parser.add_argument(_flag(item.name), action="store_true", default=None, help=text)
        elif "List" in kind:
            parser.add_argument(_flag(item.name), nargs="+", default=None, help=text)
        else:
            caster = int if "int" in kind else float if "float" in kind else str
            parser.add_argument(_flag(item.name), type=caster, default=None, help=f"{text} (default: {default})".strip())
    return parser


def parse_config(argv=None) -> TrainingConfig:
    args = vars(build_parser().parse_args(argv))
    values = {}
    for config_file in args.pop("config") or ():
        values.update(load_config_file(config_file))
    values.update({k: v for k, v in args.items() if v is not None})
    known = {f.name for f in fields(TrainingConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    return TrainingConfig(**values)


def load_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(handle) or {}
        else:
            data = json.load(handle)
    return {key.replace("-", "_"): value for key, value in data.items()}
