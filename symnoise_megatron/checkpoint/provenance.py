"""What a checkpoint was made of: the provenance record, its file, and how it reads to a person.

Every checkpoint this package writes carries ``symnoise_provenance.json`` (a training run's
``iter_N/``, a conversion's ``release/``, an exported Hugging Face directory). The record:

- ``format``, ``version``: this file's kind and layout (a reader refuses another);
- ``kind``: ``training``, ``conversion`` (HF -> megatron) or ``export`` (megatron -> HF);
- ``iteration``: the iteration the checkpoint holds (training);
- ``run``: the settings in force when it was saved. Training: the command line, every flag
  (``flags``), the data (each prefix with its weight and identity: tokenizer, template, sample
  count, file sizes, content digest; the split, seeds, seq-length, packing, batch sizes), the
  model, the noise, the layout saved under (``layout``), the base checkpoint and the software
  versions. Conversion: the source directory, model and versions. Export: the checkpoint and
  iteration exported, and that checkpoint's own record as ``source``;
- ``history``: one entry per start of the run (``start``, then a ``resume`` per restart), each
  with its iteration, time, command line, and for a resume what changed (``changed``: field ->
  [checkpoint's value, this run's]) and which changes a flag let through (``overridden``).

The training side builds the record (training/provenance.py); this module only writes, reads
and describes it, so that evaluation (symnoise-compare) and the commands (symnoise-inspect)
read it without the trainer.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Tuple

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.common.files import read_json, write_json_atomically

FILE = "symnoise_provenance.json"
FORMAT = "symnoise-megatron provenance"
VERSION = 1
KINDS = ("training", "conversion", "export")


def new_record(kind: str, run: dict, history: List[dict], **fields) -> dict:
    return {"format": FORMAT, "version": VERSION, "kind": kind, **fields, "run": run, "history": history}


def history_entry(event: str, iteration: Optional[int], **fields) -> dict:
    """One start of a run: what, at which iteration, when, and by which command line."""
    return {"event": event, "iteration": iteration, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command_line(), **fields}


def command_line() -> List[str]:
    return [sys.executable] + sys.argv if sys.argv and sys.argv[0] else [sys.executable]


def write(directory: str, record: dict) -> str:
    path = os.path.join(directory, FILE)
    write_json_atomically(path, record, indent=1)
    return path


def read(path: str) -> dict:
    """The record in ``path`` (the file, or a folder holding it); a damaged or foreign file is a
    ValueError of one line naming it."""
    if os.path.isdir(path):
        path = os.path.join(path, FILE)
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a provenance record written by symnoise-megatron "
                         f"(expected a JSON object with \"format\": \"{FORMAT}\")")
    if not isinstance(record.get("version"), int) or record["version"] > VERSION:
        raise ValueError(f"{path}: provenance format version {record.get('version')!r}; this symnoise-megatron reads "
                         f"version {VERSION} and earlier (upgrade it to read this checkpoint)")
    if record.get("kind") not in KINDS or not isinstance(record.get("run"), dict) or not isinstance(record.get("history"), list):
        raise ValueError(f"{path}: a provenance record without a valid kind, run or history; the file is damaged")
    return record


def read_if_present(directory: str) -> Optional[dict]:
    """The record in ``directory``, or None when it has none (checkpoints older than records)."""
    return read(directory) if os.path.exists(os.path.join(directory, FILE)) else None


def latest_record(root: str) -> Optional[dict]:
    """The record of the latest checkpoint under a checkpoint folder ``root``, or None."""
    return read_if_present(paths.latest_checkpoint_dir(root))


def training_record(record: Optional[dict]) -> Optional[dict]:
    """The training run behind a record: itself, or an export's source when that was trained."""
    while record is not None and record.get("kind") == "export":
        record = record.get("source")
    return record if record is not None and record.get("kind") == "training" else None


# Identity: what symnoise-compare refuses to mix ----------------------------------------------
def model_identity(record: dict) -> dict:
    """The model's shape and the checkpoint its weights started from (its HF origin when known)."""
    run = record["run"]
    base = run.get("base_checkpoint") or {}
    return {"model": run.get("model"), "base": base.get("converted_from") or base.get("path")}


def data_identity(record: dict) -> List[Tuple[float, str]]:
    """The training data: each prefix's weight (rounded) and content digest."""
    return [(round(float(entry.get("weight", 1.0)), 6), entry.get("digest"))
            for entry in record["run"].get("data", {}).get("train", [])]


# How a record reads ------------------------------------------------------------------------
def model_text(model: Optional[dict]) -> str:
    if not model:
        return "unknown"
    groups = model.get("num_query_groups") or model.get("num_attention_heads")
    return (f"{model.get('architecture', 'llama')}: {model.get('num_layers')} layers, hidden {model.get('hidden_size')}, "
            f"{model.get('num_attention_heads')} heads ({groups} key/value groups), FFN {model.get('ffn_hidden_size')}, "
            f"vocabulary {model.get('vocab_size')}")


def _short_digest(digest: Optional[str]) -> str:
    return (digest or "?").split(":")[-1][:12]


def blend_text(entries: List[dict]) -> str:
    if not entries:
        return "unknown"
    parts = []
    for entry in entries:
        weight = f"{entry['weight']:.3g} " if len(entries) > 1 else ""
        parts.append(f"{weight}{entry.get('prefix')} ({entry.get('samples')} samples, digest {_short_digest(entry.get('digest'))})")
    return " + ".join(parts)


def data_lines(run: dict) -> List[Tuple[str, str]]:
    data, flags = run.get("data", {}), run.get("flags", {})
    train = data.get("train", [])
    first = train[0] if train else {}
    tokenizer = first.get("tokenizer", {})
    rows = [("data", blend_text(train))]
    if train:
        rows.append(("", f"{first.get('prompt_template')} template, {tokenizer.get('kind')} tokenizer {tokenizer.get('file')} "
                         f"(vocabulary {tokenizer.get('vocab_size')})"))
    if data.get("valid"):
        rows.append(("validation", blend_text(data["valid"])))
    split = f"split {data.get('split')}" if data.get("split") else "no split (all of it trains)"
    rows.append(("", f"{split}, seed {data.get('seed')}; seq-length {data.get('seq_length')}, "
                     f"{'packed' if data.get('pack_sequences') else 'one sample per row'}; global batch "
                     f"{flags.get('global_batch_size')}, micro-batch {flags.get('micro_batch_size')}"))
    return rows


def noise_text(noise: Optional[dict]) -> str:
    if not noise:
        return "unknown"
    if noise.get("kind") == "none":
        return "none"
    return f"{noise.get('kind')}, alpha {noise.get('alpha')}, seed {noise.get('seed')}, {noise.get('pairing')} pairing"


def precision_text(flags: dict) -> str:
    text = "bf16" if flags.get("bf16") else "fp32"
    if flags.get("fp8_format"):
        text += f", FP8 {flags['fp8_format']} with the {flags.get('fp8_recipe')} recipe"
        if flags.get("first_last_layers_bf16"):
            text += (f" (first {flags.get('num_layers_at_start_in_bf16')} and last "
                     f"{flags.get('num_layers_at_end_in_bf16')} layers in bf16)")
    return text


def layout_text(layout: Optional[dict]) -> str:
    if not layout:
        return "unknown"
    text = (f"TP {layout.get('tensor_model_parallel_size')}, PP {layout.get('pipeline_model_parallel_size')}, "
            f"DP {layout.get('data_parallel_size')}")
    if layout.get("virtual_pipeline_model_parallel_size"):
        text += f", {layout['virtual_pipeline_model_parallel_size']} virtual stages"
    if layout.get("sequence_parallel"):
        text += ", sequence parallel"
    if layout.get("use_distributed_optimizer"):
        text += ", distributed optimizer"
    ranks = layout.get("world_size")
    return text + f" ({ranks} rank{'' if ranks == 1 else 's'})"


def versions_text(versions: Optional[dict]) -> str:
    if not versions:
        return "unknown"
    names = [("python", "Python"), ("torch", "torch"), ("megatron-core", "megatron-core"),
             ("transformer-engine", "Transformer Engine"), ("symnoise-megatron", "symnoise-megatron")]
    text = ", ".join(f"{label} {versions[key]}" for key, label in names if key in versions)
    if versions.get("symnoise-megatron git"):
        text += f" (git {versions['symnoise-megatron git'][:12]}{' with uncommitted changes' if 'uncommitted' in versions['symnoise-megatron git'] else ''})"
    return text


def _value(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def history_text(history: List[dict]) -> List[str]:
    lines = []
    for entry in history:
        where = "" if entry.get("iteration") is None else f"iteration {entry['iteration']}: "
        what = f"{where}{entry.get('event')}"
        if entry.get("time"):
            what += f" {entry['time']}"
        if entry.get("note"):
            what += f" ({entry['note']})"
        changed = entry.get("changed") or {}
        if changed:
            overridden = set(entry.get("overridden") or [])
            what += "; " + ", ".join(f"{name} {_value(now)} (was {_value(was)}{', overridden' if name in overridden else ''})"
                                     for name, (was, now) in changed.items())
        lines.append(what)
    return lines


def describe(record: dict) -> List[Tuple[str, str]]:
    """(label, text) rows for a person: what the record says, most telling first."""
    run, kind = record["run"], record["kind"]
    rows: List[Tuple[str, str]] = []
    if kind == "training":
        rows.append(("model", model_text(run.get("model"))))
        base = run.get("base_checkpoint")
        if base:
            rows.append(("", f"from {base.get('path')}" + (f" (converted from {base['converted_from']})"
                                                            if base.get("converted_from") else "")))
        rows += data_lines(run)
        rows.append(("noise", noise_text(run.get("noise"))))
        rows.append(("precision", precision_text(run.get("flags", {}))))
        rows.append(("saved under", layout_text(run.get("layout"))))
    elif kind == "conversion":
        rows.append(("model", model_text(run.get("model"))))
        rows.append(("converted", f"from {run.get('converted_from')} ({run.get('dtype') or 'dtype as stored'})"))
    else:  # export
        rows.append(("exported", f"from {run.get('exported_from')} at iteration {run.get('iteration')}"))
        source = record.get("source")
        if source is None:
            rows.append(("source", "provenance unknown (the checkpoint had no record)"))
        else:
            rows += [(label, text) for label, text in describe(source) if label not in ("versions", "history", "command")]
    rows.append(("versions", versions_text(run.get("versions"))))
    for number, line in enumerate(history_text(record.get("history", []))):
        rows.append(("history" if number == 0 else "", line))
    command = (record.get("history") or [{}])[-1].get("command") or run.get("command")
    if command:
        rows.append(("command", " ".join(command)))
    return rows


def label(record: dict) -> str:
    """One line naming a training run: its noise, model, data, seed and where it stands."""
    run = record["run"]
    model = run.get("model") or {}
    train = run.get("data", {}).get("train", [])
    data = " + ".join((f"{e['weight']:.2g} " if len(train) > 1 else "") + os.path.basename(str(e.get("prefix"))) for e in train)
    return (f"noise {noise_text(run.get('noise'))}; {model.get('architecture', 'llama')} {model.get('num_layers')} layers, "
            f"hidden {model.get('hidden_size')}; data {data or '?'}; seed {run.get('flags', {}).get('seed')}; "
            f"iteration {record.get('iteration')}")
