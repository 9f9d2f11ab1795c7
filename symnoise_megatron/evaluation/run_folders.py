"""Run folders: everything the paper's tables need about one fine-tune, in one folder.

A run folder holds

- ``run.json``: the run's labels, ``{"dataset": "alpaca", "model": "llama-2-7b",
  "noise": {"kind": "symmetric", "alpha": 5}, "seed": 1}`` (``noise`` as the checkpoint records
  it, ``NoiseConfig.to_dict()``; ``seed`` optional). Folders with the same labels are seeds of
  one setting.
- any number of ``symnoise-evaluate`` results, found by content (``"evaluation"``):
  ``alpacaeval`` results (one per annotator) and one ``leaderboard`` result;
- ``outputs.json`` (optional): the run's answers, for the text statistics and the average
  length in characters;
- ``train.log`` (optional): the fine-tune's console log, for the loss table and curves.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from symnoise_megatron.evaluation.metrics import read_outputs
from symnoise_megatron.noise.config import NOISE_KINDS

RUN_FILE = "run.json"
OUTPUTS_FILE = "outputs.json"
LOG_FILE = "train.log"
# The papers' names for the kinds of noise.
KIND_NAMES = {"none": "none", "uniform": "NEFTune", "symmetric": "SymNoise", "gaussian": "gaussian",
              "bernoulli": "bernoulli"}
RUN_FILE_EXAMPLE = '{"dataset": "alpaca", "model": "llama-2-7b", "noise": {"kind": "symmetric", "alpha": 5}}'


@dataclass
class RunFolder:
    path: str
    dataset: str
    model: str
    kind: str
    alpha: float
    seed: Optional[int] = None
    alpacaeval: Dict[str, dict] = field(default_factory=dict)  # by annotator
    leaderboard: Optional[dict] = None
    outputs: Optional[List[str]] = None
    log: Optional[str] = None

    @property
    def noisy(self) -> bool:
        return self.kind != "none" and self.alpha > 0

    @property
    def setting(self) -> str:
        """``none``, ``NEFTune α=5``, ``SymNoise α=10``, ``gaussian α=5``..."""
        return f"{KIND_NAMES[self.kind]} α={self.alpha:g}" if self.noisy else "none"

    @property
    def order(self):
        """Sort key of settings: none, then the kinds in NOISE_KINDS order, then alpha."""
        return (NOISE_KINDS.index(self.kind) if self.noisy else -1, self.alpha if self.noisy else 0.0)


def _load(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error})") from None


def read_run_folder(path: str) -> RunFolder:
    """The folder's labels and results; a missing or malformed run.json, or two results of one
    kind that would both claim a table cell, is one line naming the file."""
    if not os.path.isdir(path):
        raise ValueError(f"--run-dir {path}: no such folder")
    labels_path = os.path.join(path, RUN_FILE)
    if not os.path.isfile(labels_path):
        raise ValueError(f"{path}: no {RUN_FILE} (the run's labels, e.g. {RUN_FILE_EXAMPLE})")
    labels = _load(labels_path)
    noise = labels.get("noise") if isinstance(labels, dict) else None
    if (not isinstance(noise, dict) or noise.get("kind") not in NOISE_KINDS
            or not isinstance(noise.get("alpha", 0), (int, float))
            or not all(isinstance(labels.get(key), str) and labels[key] for key in ("dataset", "model"))):
        raise ValueError(f"{labels_path}: expected {RUN_FILE_EXAMPLE} (noise kind one of {', '.join(NOISE_KINDS)})")
    folder = RunFolder(path=path, dataset=labels["dataset"], model=labels["model"], kind=noise["kind"],
                       alpha=float(noise.get("alpha", 0)), seed=labels.get("seed"))
    for result_path in sorted(glob.glob(os.path.join(path, "*.json"))):
        if os.path.basename(result_path) in (RUN_FILE, OUTPUTS_FILE):
            continue
        result = _load(result_path)
        kind = result.get("evaluation") if isinstance(result, dict) else None
        if kind == "alpacaeval":
            annotator = result["annotator"]
            if annotator in folder.alpacaeval:
                raise ValueError(f"{path}: two alpacaeval results judged by {annotator} "
                                 f"({folder.alpacaeval[annotator]['_file']} and {result_path})")
            folder.alpacaeval[annotator] = dict(result, _file=result_path)
        elif kind == "leaderboard":
            if folder.leaderboard is not None:
                raise ValueError(f"{path}: two leaderboard results ({folder.leaderboard['_file']} and {result_path})")
            folder.leaderboard = dict(result, _file=result_path)
    outputs = os.path.join(path, OUTPUTS_FILE)
    folder.outputs = read_outputs(outputs) if os.path.isfile(outputs) else None
    log = os.path.join(path, LOG_FILE)
    folder.log = log if os.path.isfile(log) else None
    if not (folder.alpacaeval or folder.leaderboard or folder.outputs):
        raise ValueError(f"{path}: no symnoise-evaluate results and no {OUTPUTS_FILE}: nothing to tabulate")
    return folder
