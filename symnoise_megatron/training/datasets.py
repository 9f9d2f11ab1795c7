"""The run's data: the train and validation sets, their split, and the tokenizer checks."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.data.blend import BlendEntry, BlendOrder, ConcatenatedSamples, normalized_weights, parse_blend
from symnoise_megatron.data.sampler import SampleOrder
from symnoise_megatron.data.sft_dataset import SFTIndexedData, split_indices
from symnoise_megatron.data.tokenizer import TokenizerSpec, identity_differences
from symnoise_megatron.training.arguments import TOKENIZER_TYPES, DataOptions


@dataclass
class TrainingData:
    """The train set and the validation set (the same prefixes under --split), with the sample
    indices each one reads. With a blend (several --data-path prefixes), ``train`` and ``valid``
    put the prefixes' samples in one index space, and the index arrays hold each prefix's part
    in turn (``train_parts``/``valid_parts``: how many of each)."""

    train: ConcatenatedSamples
    valid: ConcatenatedSamples
    train_indices: np.ndarray
    valid_indices: np.ndarray
    options: DataOptions
    test_indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # --split's third part
    train_blend: List[BlendEntry] = field(default_factory=list)
    valid_blend: List[BlendEntry] = field(default_factory=list)
    train_parts: List[int] = field(default_factory=list)
    valid_parts: List[int] = field(default_factory=list)
    train_weights: List[float] = field(default_factory=list)  # normalised, one per prefix
    valid_weights: List[float] = field(default_factory=list)

    @property
    def vocab_size(self) -> int:
        return self.train.meta["tokenizer"]["vocab_size"]

    @property
    def pad_id(self) -> int:
        return self.train.meta["tokenizer"].get("eos_id") or 0

    @property
    def mean_sample_length(self) -> int:
        metas = [part.meta for part in self.train.parts]
        return round(sum(m["tokens"] for m in metas) / max(1, sum(m["samples"] for m in metas)))

    def train_order(self, seed: int):
        """The run's sample order over the train indices (one prefix: as before blends existed)."""
        if len(self.train_parts) == 1:
            return SampleOrder(self.train_parts[0], seed)
        return BlendOrder(self.train_parts, self.train_weights, seed)

    def valid_order(self):
        """Validation reads the same samples at every evaluation: no shuffle, the blend's weights kept."""
        sizes = [n for n in self.valid_parts if n]
        if len(sizes) <= 1:
            return SampleOrder(max(1, len(self.valid_indices)), shuffle=False)
        weights = [w for w, n in zip(self.valid_weights, self.valid_parts) if n]
        return BlendOrder(sizes, [w / sum(weights) for w in weights], shuffle=False)

    def split_description(self) -> str:
        """How many samples each part got, for the log: a --split test part is named as set aside."""
        data_path = " ".join(self.options.data_path)
        if self.options.valid_data_path:
            return (f"--data-path {data_path}: {len(self.train_indices)} samples to train on; "
                    f"--valid-data-path {' '.join(self.options.valid_data_path)}: {len(self.valid_indices)} to validate on")
        return (f"--split {self.options.split} of the {len(self.train)} samples of --data-path {data_path}: "
                f"{len(self.train_indices)} train, {len(self.valid_indices)} validation, {len(self.test_indices)} test "
                "(the test part is set aside: neither trained nor validated on)")

    def validation_note(self, eval_interval: Optional[int]) -> Optional[str]:
        """A line for the log when validation and the split disagree: validation asked for with an
        empty validation part (skipped), or a --split validation part held back that no validation
        reads (those samples are not trained on either)."""
        if eval_interval and not len(self.valid_indices):
            source = (f"--valid-data-path {' '.join(self.options.valid_data_path)}" if self.options.valid_data_path
                      else f"--split {self.options.split}")
            return f"no validation: the validation part is empty ({source}), so --eval-interval {eval_interval} is skipped"
        if not eval_interval and len(self.valid_indices) and not self.options.valid_data_path:
            return (f"--split {self.options.split} holds back {len(self.valid_indices)} samples for validation, which "
                    "never runs without --eval-interval: they are not trained on (--split 100,0 trains on every sample)")
        return None

    def blend_description(self, order, total_samples: int) -> Optional[str]:
        """For a blend, what the run's ``total_samples`` draw from each prefix and how often each is seen."""
        if len(self.train_parts) < 2:
            return None
        counts = order.counts(total_samples)
        shares = [f"{entry.prefix} (weight {weight:.3g}): {count} samples from its {size}, each seen "
                  f"{count / size:.2f} times" for entry, weight, size, count in
                  zip(self.train_blend, self.train_weights, self.train_parts, counts)]
        return f"--data-path blend of {len(self.train_parts)} prefixes over the run's {total_samples} samples: " + "; ".join(shares)

    def described(self) -> List[Tuple[str, str, dict]]:
        """(flag, prefix, meta) for every prefix of --data-path and --valid-data-path."""
        sets = [("--data-path", entry.prefix, part.meta) for entry, part in zip(self.train_blend, self.train.parts)]
        if self.options.valid_data_path:
            sets += [("--valid-data-path", entry.prefix, part.meta) for entry, part in zip(self.valid_blend, self.valid.parts)]
        return sets


def _preprocessed_alike(sets: List[Tuple[str, str, dict]]) -> None:
    """Every prefix of a run must come from one tokenizer and one template, or one model would
    read two vocabularies (or two prompt formats) under one set of weights."""
    def described(meta):
        return ({key: meta["tokenizer"][key] for key in ("kind", "vocab_size", "bos_id", "eos_id")}
                | {"prompt_template": meta["prompt_template"]})

    first_flag, first_prefix, first_meta = sets[0]
    for flag, prefix, meta in sets[1:]:
        if described(meta) != described(first_meta):
            raise ValueError(f"{flag} {prefix} was preprocessed with another tokenizer or template than {first_flag} "
                             f"{first_prefix}: {described(meta)} vs {described(first_meta)}")


def load_training_data(options: DataOptions, seed: int) -> TrainingData:
    """The data sets of ``options``; every prefix must share the first's tokenizer and template."""
    train_blend = parse_blend(options.data_path, "--data-path")
    train = ConcatenatedSamples([SFTIndexedData(entry.prefix) for entry in train_blend])
    if options.valid_data_path:
        valid_blend = parse_blend(options.valid_data_path, "--valid-data-path")
        valid = ConcatenatedSamples([SFTIndexedData(entry.prefix) for entry in valid_blend])
        train_splits = [(np.arange(len(part)), np.empty(0, np.int64), np.empty(0, np.int64)) for part in train.parts]
        valid_splits = [(np.empty(0, np.int64), np.arange(len(part)), np.empty(0, np.int64)) for part in valid.parts]
    else:
        valid_blend, valid = train_blend, train
        # Megatron-LM's rule for a blend: each prefix is split by --split on its own.
        train_splits = valid_splits = [split_indices(len(part), options.split_weights, seed) for part in train.parts]
    data = TrainingData(
        train, valid,
        np.concatenate([indices + start for (indices, _, _), start in zip(train_splits, train.starts)]),
        np.concatenate([indices + start for (_, indices, _), start in zip(valid_splits, valid.starts)]),
        options,
        np.concatenate([indices + start for (_, _, indices), start in zip(train_splits, train.starts)]),
        train_blend, valid_blend,
        [len(t) for t, _, _ in train_splits], [len(v) for _, v, _ in valid_splits])
    _preprocessed_alike(data.described())
    for entry, part, size in zip(train_blend, train.parts, data.train_parts):
        if not size:
            raise ValueError(f"--data-path {entry.prefix}: none of its {len(part)} samples is left to train on "
                             f"under --split {options.split}")
    data.train_weights = normalized_weights(train_blend, data.train_parts)
    data.valid_weights = (normalized_weights(valid_blend, data.valid_parts) if options.valid_data_path
                          else data.train_weights)
    return data


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
