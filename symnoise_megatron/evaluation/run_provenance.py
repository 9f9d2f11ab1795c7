"""What the runs put side by side were: each run's provenance record, found from its training
log (the checkpoints it saved) or its outputs file (the model that answered), a label per run,
and the check that the runs of one table trained the same model on the same data.

A table of noise settings means something only when everything else is equal: runs of another
base model or another data blend are refused unless the user asks for a mixed table.
"""

from __future__ import annotations

import json
import os
import re
from typing import List, Optional, Sequence, Tuple

from symnoise_megatron.checkpoint import paths, provenance
from symnoise_megatron.evaluation.records import meta_path

_SAVED = re.compile(r"saved checkpoint at iteration \d+ to (.+?)\s*$")


def _saved_checkpoint(log_path: str) -> Optional[str]:
    """The last checkpoint a training log says it saved, resolved as the run saw it (its working
    folder, else the log's folder)."""
    last = None
    with open(log_path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if match := _SAVED.search(line):
                last = match.group(1)
    if last is None:
        return None
    for candidate in (last, os.path.join(os.path.dirname(os.path.abspath(log_path)), last)):
        if os.path.isdir(candidate):
            return candidate
    return None


def _answering_model(outputs_path: str) -> Optional[str]:
    """The folder whose record describes the weights that wrote an outputs file."""
    try:
        with open(meta_path(outputs_path), encoding="utf-8") as handle:
            generator = json.load(handle).get("generator", {})
    except (OSError, ValueError, AttributeError):
        return None
    model, iteration = generator.get("model"), generator.get("checkpoint_iteration")
    if not model or not os.path.isdir(model):
        return None
    if paths.has_checkpoint(model):
        return paths.iteration_dir(model, None if iteration in (None, "release") else int(iteration))
    return model


def run_record(log_path: str, outputs_path: Optional[str] = None) -> Tuple[Optional[dict], str]:
    """The training record behind a run, and where it was found (or why it was not)."""
    for folder in (_saved_checkpoint(log_path), _answering_model(outputs_path) if outputs_path else None):
        if folder and os.path.exists(os.path.join(folder, provenance.FILE)):
            record = provenance.training_record(provenance.read(folder))
            if record is not None:
                return record, folder
    return None, f"{log_path} names no checkpoint with a provenance record" + (
        f", nor does {meta_path(outputs_path)}" if outputs_path else "")


def check_comparable(runs: Sequence[Tuple[str, Optional[dict]]], allow_mixed: bool) -> List[str]:
    """Refuse runs of different models or data in one table (unless ``allow_mixed``); notes on
    runs whose provenance is unknown."""
    known = [(name, record) for name, record in runs if record is not None]
    notes = [f"note: the provenance of run {name} is unknown; it is not checked against the others"
             for name, record in runs if record is None]
    if not known:
        return notes
    first_name, first = known[0]
    for name, record in known[1:]:
        differences = []
        if provenance.model_identity(record) != provenance.model_identity(first):
            differences.append(f"model {provenance.model_text(record['run'].get('model'))} from "
                               f"{provenance.model_identity(record)['base']} (run {first_name}: "
                               f"{provenance.model_text(first['run'].get('model'))} from {provenance.model_identity(first)['base']})")
        if provenance.data_identity(record) != provenance.data_identity(first):
            differences.append(f"data {provenance.blend_text(record['run']['data']['train'])} (run {first_name}: "
                               f"{provenance.blend_text(first['run']['data']['train'])})")
        if not differences:
            continue
        message = f"run {name} trained another " + " and ".join(differences)
        if not allow_mixed:
            raise ValueError(message + "; one table compares runs of one model on one data set (pass --allow-mixed "
                             "to put them together anyway)")
        notes.append(f"WARNING: {message} (--allow-mixed)")
    return notes


def provenance_table(runs: Sequence[Tuple[str, Optional[dict], str]]) -> str:
    """One row per run (seeds of a setting each get theirs): what its provenance says."""
    lines = ["| setting | run (from its provenance) | recorded in |", "|---|---|---|"]
    for name, record, where in runs:
        lines.append(f"| {name} | {provenance.label(record) if record else 'unknown'} | {where} |")
    return "\n".join(lines)
