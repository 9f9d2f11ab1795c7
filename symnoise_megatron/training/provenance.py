"""The run's provenance record (format: checkpoint/provenance.py): built at start, checked against
the checkpoint's at resume, handed to every save.

At resume, a change of what the run trains on is refused, naming each change with both values,
unless --override-data-config (then one warning per change): the consumed-sample count a
checkpoint resumes from indexes its data's sample order, and another prefix, another content,
another --seq-length, --pack-sequences, --split or --seed makes it index other samples. The
changes Megatron-LM allows on purpose (batch sizes, learning rate and schedule, intervals,
logging; here also the layout, precision and software versions) are listed in one line. Every
change, allowed or overridden, goes into the record's history.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import torch.distributed as dist

from symnoise_megatron.checkpoint import paths, provenance
from symnoise_megatron.common.versions import software_versions
from symnoise_megatron.data.blend import BlendEntry, blend_text
from symnoise_megatron.data.identity import prefix_identity
from symnoise_megatron.model.config import ModelConfig
from symnoise_megatron.model.parallelism import ParallelConfig
from symnoise_megatron.noise.config import NoiseConfig
from symnoise_megatron.training.arguments import TrainingConfig, flag_name
from symnoise_megatron.training.datasets import TrainingData

# Flags that decide which sample a consumed-sample count names: a resume may not change them silently.
DATA_FLAGS = ("data_path", "seq_length", "pack_sequences", "split", "seed")
# Flags the record keeps but a resume does not compare: where the run is, how it was started,
# what other checks already decide (the model: --load and the checkpoint; the noise: its own check).
NOT_COMPARED = {"save", "load", "finetune", "model", "num_layers", "make_vocab_size_divisible_by", "valid_data_path",
                "override_opt_param_scheduler", "use_checkpoint_opt_param_scheduler", "override_noise_config",
                "override_data_config", "tokenizer_model", "tokenizer_type", "allow_tokenizer_mismatch",
                "noise_kind", "noise_alpha", "noise_seed", "noise_pairing"}


def _prefixes(blend, parts: List[int], weights: List[float]) -> List[dict]:
    return [{"weight": weight, "part_samples": size, **prefix_identity(entry.prefix)}
            for entry, size, weight in zip(blend, parts, weights)]


def base_checkpoint(load: Optional[str]) -> Optional[dict]:
    """The checkpoint the weights came from: its folder, iteration and Hugging Face origin."""
    if not load:
        return None
    iteration = paths.read_tracker(load)
    return {"path": os.path.abspath(load), "iteration": "release" if iteration is None else iteration,
            "converted_from": paths.read_info(load).get("converted_from")}


def run_settings(config: TrainingConfig, datasets: TrainingData, model: ModelConfig, parallel: ParallelConfig,
                 noise: NoiseConfig, world_size: int) -> dict:
    """The ``run`` section of this run's record."""
    options = config.data
    data = {
        "train": _prefixes(datasets.train_blend, datasets.train_parts, datasets.train_weights),
        "valid": (_prefixes(datasets.valid_blend, datasets.valid_parts, datasets.valid_weights)
                  if options.valid_data_path else None),
        "split": None if options.valid_data_path else options.split,
        "seed": config.optimizer.seed,  # seeds the split and the sample order
        "seq_length": options.seq_length, "pack_sequences": options.pack_sequences,
        "global_batch_size": config.optimizer.global_batch_size, "micro_batch_size": config.optimizer.micro_batch_size,
    }
    layout = asdict(parallel) | {
        "data_parallel_size": parallel.data_parallel_size(world_size), "world_size": world_size,
        "use_distributed_optimizer": config.parallelism.use_distributed_optimizer}
    return {"flags": config.flags(), "data": data, "model": asdict(model), "noise": noise.to_dict(),
            "layout": layout, "base_checkpoint": base_checkpoint(config.model.load), "versions": software_versions()}


@dataclass
class Changes:
    """A resume's changes against the checkpoint's record, as 'name: [checkpoint's, this run's]'."""

    data: List[Tuple[str, str]] = field(default_factory=list)  # (name, text): refused unless overridden
    noise: List[str] = field(default_factory=list)  # names; its own check has refused or allowed them
    allowed: List[Tuple[str, str]] = field(default_factory=list)
    values: dict = field(default_factory=dict)


def _text(value) -> str:
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _note(changes: Changes, kind: str, name: str, was, now, text: Optional[str] = None) -> None:
    changes.values[name] = [was, now]
    if kind == "noise":
        changes.noise.append(name)
    else:
        getattr(changes, kind).append((name, text or f"{name} {_text(now)} (checkpoint: {_text(was)})"))


def _blend(entries: List[dict]) -> str:
    """Recorded prefixes as the flag reads: ``0.7 A 0.3 B``, or the one prefix."""
    return blend_text([BlendEntry(e["prefix"], e["weight"] if len(entries) > 1 else None) for e in entries])


def _compare_prefixes(changes: Changes, flag: str, saved: Optional[List[dict]], ours: Optional[List[dict]],
                      kind: str) -> None:
    saved, ours = saved or [], ours or []
    if [e.get("prefix") for e in saved] == [e["prefix"] for e in ours] and \
            [e.get("digest") for e in saved] == [e["digest"] for e in ours] and \
            [round(e.get("weight", 1.0), 9) for e in saved] == [round(e["weight"], 9) for e in ours]:
        return
    was, now = _blend(saved) if saved else None, _blend(ours) if ours else None
    same_data = ([e.get("digest") for e in saved] == [e["digest"] for e in ours]
                 and [round(e.get("weight", 1.0), 9) for e in saved] == [round(e["weight"], 9) for e in ours])
    if same_data:  # moved (another path, the same files): not a change of data
        _note(changes, "allowed", flag, was, now, f"{flag} {now} (checkpoint: {was}; moved, the same content)")
        return
    if was == now:  # the same prefixes and weights, other files
        details = ", ".join(f"{e['prefix']} now has digest {e['digest'].split(':')[-1][:12]} and {e['samples']} samples "
                            f"(checkpoint: digest {str(s.get('digest')).split(':')[-1][:12]}, {s.get('samples')} samples)"
                            for s, e in zip(saved, ours) if s.get("digest") != e["digest"])
        _note(changes, kind, flag, [s.get("digest") for s in saved], [e["digest"] for e in ours],
              f"{flag} {now}: other content: {details}")
        return
    _note(changes, kind, flag, was, now)


def compare_runs(saved: dict, ours: dict) -> Changes:
    """What differs between the checkpoint's ``run`` and this run's, sorted into data changes,
    noise changes and the changes a resume allows."""
    changes = Changes()
    saved_data, data = saved.get("data", {}), ours["data"]
    _compare_prefixes(changes, "--data-path", saved_data.get("train"), data["train"], "data")
    for key in ("seq_length", "pack_sequences", "split", "seed"):
        if key in saved_data and saved_data[key] != data[key]:
            was, now = saved_data[key], data[key]
            if key == "split":
                was, now = (v if v is not None else "none (all trains, --valid-data-path)" for v in (was, now))
            _note(changes, "data", flag_name(key), was, now)
    _compare_prefixes(changes, "--valid-data-path", saved_data.get("valid"), data["valid"], "allowed")
    saved_noise = saved.get("noise") or {}
    for key, value in ours["noise"].items():
        if key in saved_noise and saved_noise[key] != value:
            _note(changes, "noise", flag_name("noise_" + key), saved_noise[key], value)
    saved_flags = saved.get("flags", {})
    for key, value in ours["flags"].items():
        if key in DATA_FLAGS or key in NOT_COMPARED or key not in saved_flags or saved_flags[key] == value:
            continue
        _note(changes, "allowed", flag_name(key), saved_flags[key], value)
    for key in ("data_parallel_size", "world_size"):
        was = (saved.get("layout") or {}).get(key)
        if was is not None and was != ours["layout"][key]:
            _note(changes, "allowed", key.replace("_", "-"), was, ours["layout"][key])
    saved_versions = saved.get("versions") or {}
    for key, value in ours["versions"].items():
        if saved_versions.get(key, value) != value:
            _note(changes, "allowed", key, saved_versions[key], value)
    return changes


def resume_history(save: str, saved: Optional[dict], ours: dict, override_data: bool, log) -> List[dict]:
    """The record's history after this resume; raises ValueError for a data change not overridden."""
    iteration = paths.read_tracker(save)
    directory = paths.latest_checkpoint_dir(save)
    if saved is None:
        log(f"provenance of {directory} is unknown: it was saved without a provenance record (an older "
            f"symnoise-megatron); this run's settings are recorded from iteration {iteration} on")
        return [provenance.history_entry("resume", iteration, note="provenance before this iteration unknown")]
    changes = compare_runs(saved["run"], ours)
    if changes.data and not override_data:
        raise ValueError(f"--save {save}: this run's data differs from the checkpoint's (iteration {iteration}): "
                         + "; ".join(text for _, text in changes.data)
                         + "; pass --override-data-config to train on with this run's (the consumed-sample count "
                         "then indexes the new data's sample order)")
    for _, text in changes.data:
        log(f"WARNING: --save {save}: {text} (--override-data-config: training on with this run's)")
    if changes.allowed:
        log(f"resuming {directory} with changes a resume allows: " + ", ".join(text for _, text in changes.allowed))
    entry = provenance.history_entry("resume", iteration)
    if changes.values:
        entry["changed"] = changes.values
        overridden = [name for name, _ in changes.data] + changes.noise
        if overridden:
            entry["overridden"] = overridden
    return list(saved.get("history", [])) + [entry]


def start_record(config: TrainingConfig, datasets: TrainingData, model: ModelConfig, parallel: ParallelConfig,
                 noise: NoiseConfig, resuming: bool, log) -> dict:
    """This run's record, checked against the checkpoint's when it resumes. Rank 0 reads the files
    and decides; every rank gets the record or raises the same error."""
    verdict = [None, None]
    if dist.get_rank() == 0:
        try:
            run = run_settings(config, datasets, model, parallel, noise, dist.get_world_size())
            save = config.checkpoint.save
            if resuming:
                saved = provenance.latest_record(save)
                if saved is not None and saved["run"].get("base_checkpoint"):
                    run["base_checkpoint"] = saved["run"]["base_checkpoint"]  # where the run began, not --load now
                history = resume_history(save, saved, run, config.data.override_data_config, log)
            else:
                history = [provenance.history_entry("start", 0)]
            verdict = [None, provenance.new_record("training", run, history)]
        except (ValueError, FileNotFoundError) as error:
            verdict = [str(error), None]
    dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ValueError(verdict[0])
    return verdict[1]


def with_iteration(record: dict, iteration: int) -> dict:
    """The record as one checkpoint saves it."""
    return {**record, "iteration": iteration}
