"""The run's data: the train and validation sets, their split, and the tokenizer checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.data.sft_dataset import SFTIndexedData, split_indices
from symnoise_megatron.data.tokenizer import TokenizerSpec, identity_differences
from symnoise_megatron.training.arguments import TOKENIZER_TYPES, DataOptions


@dataclass
class TrainingData:
    """The train set and the validation set (the same file under --split), with the sample
    indices each one reads."""

    train: SFTIndexedData
    valid: SFTIndexedData
    train_indices: np.ndarray
    valid_indices: np.ndarray
    options: DataOptions
    test_indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # --split's third part

    @property
    def vocab_size(self) -> int:
        return self.train.meta["tokenizer"]["vocab_size"]

    @property
    def pad_id(self) -> int:
        return self.train.meta["tokenizer"].get("eos_id") or 0

    @property
    def mean_sample_length(self) -> int:
        return round(self.train.meta["tokens"] / max(1, self.train.meta["samples"]))

    def split_description(self) -> str:
        """How many samples each part got, for the log: a --split test part is named as set aside."""
        if self.options.valid_data_path:
            return (f"--data-path {self.options.data_path[0]}: {len(self.train_indices)} samples to train on; "
                    f"--valid-data-path {self.options.valid_data_path[0]}: {len(self.valid_indices)} to validate on")
        return (f"--split {self.options.split} of the {len(self.train)} samples of --data-path {self.options.data_path[0]}: "
                f"{len(self.train_indices)} train, {len(self.valid_indices)} validation, {len(self.test_indices)} test "
                "(the test part is set aside: neither trained nor validated on)")

    def described(self) -> List[Tuple[str, str, dict]]:
        """(flag, prefix, meta) for --data-path and --valid-data-path."""
        sets = [("--data-path", self.options.data_path[0], self.train.meta)]
        if self.options.valid_data_path:
            sets.append(("--valid-data-path", self.options.valid_data_path[0], self.valid.meta))
        return sets


def load_training_data(options: DataOptions, seed: int) -> TrainingData:
    """The data sets of ``options``; a held-out set must share the train set's tokenizer and template."""
    train = SFTIndexedData(options.data_path[0])
    if not options.valid_data_path:
        train_indices, valid_indices, test_indices = split_indices(len(train), options.split_weights, seed)
        return TrainingData(train, train, train_indices, valid_indices, options, test_indices)
    valid = SFTIndexedData(options.valid_data_path[0])
    described = [{key: d.meta["tokenizer"][key] for key in ("kind", "vocab_size", "bos_id", "eos_id")}
                 | {"prompt_template": d.meta["prompt_template"]} for d in (train, valid)]
    if described[0] != described[1]:
        raise ValueError(f"--valid-data-path {options.valid_data_path[0]} was preprocessed with another tokenizer "
                         f"or template than --data-path {options.data_path[0]}: {described[1]} vs {described[0]}")
    return TrainingData(train, valid, np.arange(len(train)), np.arange(len(valid)), options)


def check_tokenizers(options: DataOptions, datasets, checkpoint_root: Optional[str], log) -> None:
    """The data's recorded tokenizer against --tokenizer-model/--tokenizer-type and against the
    tokenizer in the checkpoint's hf_assets: data tokenized for another vocabulary trains
    without an error otherwise (ids simply index other embedding rows).

    ``datasets``: (flag, prefix, meta) for --data-path and --valid-data-path."""
    if options.tokenizer_type:
        # A type names a file format, not a vocabulary: LLaMA's tokenizer ships as tokenizer.model
        # and tokenizer.json alike, so another format is only worth a word; identities decide.
        expected = TOKENIZER_TYPES[options.tokenizer_type]
        for flag, prefix, meta in datasets:
            if meta["tokenizer"].get("kind") != expected:
                log(f"WARNING: --tokenizer-type {options.tokenizer_type} names a {expected} tokenizer; {flag} {prefix} was "
                    f"tokenized from a {meta['tokenizer'].get('kind')} file ({meta['tokenizer'].get('path')}). Training uses "
                    "the data's tokens; the checks against --tokenizer-model and the checkpoint's tokenizer decide")
    if options.tokenizer_model:
        given = options.tokenizer_model
        spec = TokenizerSpec(model_file=given) if os.path.isfile(given) else TokenizerSpec(directory=given)
        identity = spec.load().identity()
        for flag, prefix, meta in datasets:
            differences = identity_differences(meta["tokenizer"], identity)
            if differences:
                raise ValueError(f"--tokenizer-model {given} is not the tokenizer {flag} {prefix} was preprocessed with "
                                 f"({meta['tokenizer'].get('path')}): {'; '.join(differences)}. The data carries its "
                                 "tokenizer; --tokenizer-model only checks it")
    if not checkpoint_root:
        return
    assets = os.path.join(checkpoint_root, paths.HF_ASSETS)
    if not any(os.path.exists(os.path.join(assets, name)) for name in ("tokenizer.json", "tokenizer.model")):
        return  # a checkpoint without a tokenizer (a preset trained from scratch): nothing to compare
    identity = TokenizerSpec(directory=assets).load().identity()
    for flag, prefix, meta in datasets:
        differences = identity_differences(meta["tokenizer"], identity)
        if not differences:
            continue
        message = (f"{flag} {prefix} was tokenized with {meta['tokenizer'].get('path')}, which is not the tokenizer of the "
                   f"checkpoint {checkpoint_root} ({assets}): {'; '.join(differences)}")
        if not options.allow_tokenizer_mismatch:
            raise ValueError(message + "; preprocess the data with the checkpoint's tokenizer, or pass "
                             "--allow-tokenizer-mismatch to train anyway")
        log("WARNING: " + message + " (--allow-tokenizer-mismatch: training anyway)")
