"""The Open LLM Leaderboard tasks through lm-evaluation-harness (``lm-eval``): Figure 1 of the paper.

The paper (after NEFTune) checks that noisy fine-tuning keeps multiple-choice skills on the
Open LLM Leaderboard v1 set: ARC-Challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot and
TruthfulQA-MC2 0-shot, each with the leaderboard's metric (``acc_norm`` for ARC and HellaSwag,
``acc`` for MMLU and TruthfulQA-MC2). Any lm-eval task can be asked for instead, including task
YAMLs kept on disk (``include_path``: clusters without hub access).

The model is lm-eval's own Hugging Face wrapper (``HFLM``), built once; tasks that share a
shot count run in one ``simple_evaluate`` call. lm-eval's request cache (a SQLite file that
each answered request is added to as it is computed) makes the run resumable: a rerun, or a
run killed half way, asks the model only what the cache does not hold. lm-eval keys that cache
by request alone, so its file is named after the model's identity (path, weight files' sizes
and times, dtype): another checkpoint never reads this one's answers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from symnoise_megatron.common.extras import install_command, require
from symnoise_megatron.evaluation.records import write_json

OPEN_LLM_LEADERBOARD_V1: Dict[str, int] = {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "truthfulqa_mc2": 0}
# The metric the leaderboard reported for each; other tasks report acc_norm, else acc, else their first.
PRIMARY_METRICS: Dict[str, str] = {"arc_challenge": "acc_norm", "hellaswag": "acc_norm", "mmlu": "acc",
                                   "truthfulqa_mc2": "acc"}
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LeaderboardConfig:
    """One lm-eval run over a Hugging Face checkpoint.

    Attributes:
        hf_dir: the checkpoint (``symnoise-convert megatron-to-hf``'s output or any HF directory).
        output: the summary JSON; lm-eval's own results go beside it (``NAME.lm_eval.json``).
        tasks: task (or group) -> shots; None keeps the task's own default.
        batch_size: lm-eval's batch size, a number or ``auto`` (None: auto on a GPU, 8 on CPU).
        limit: at most this many documents per task (a fraction below 1), for trial runs.
        device: ``cuda``, ``cuda:1``, ``cpu``... (None: cuda when there is one).
        include_path: a folder of task YAMLs added to lm-eval's own.
        dtype: the weights' dtype (``auto``: bfloat16 on a GPU, float32 on CPU).
        cache: lm-eval's request-cache prefix (None: ``NAME.lm_eval_cache/`` beside ``output``).
    """

    hf_dir: str
    output: str
    tasks: Dict[str, Optional[int]] = field(default_factory=lambda: dict(OPEN_LLM_LEADERBOARD_V1))
    batch_size: Optional[str] = None
    limit: Optional[float] = None
    device: Optional[str] = None
    include_path: Optional[str] = None
    dtype: str = "auto"
    cache: Optional[str] = None


def parse_tasks(tasks: Optional[str], num_fewshot: Optional[str]) -> Dict[str, Optional[int]]:
    """``--tasks a,b`` (default: the leaderboard's four) and ``--num-fewshot`` as one number for
    every task or ``TASK=N,...`` for some (the others keep the leaderboard's, else their own)."""
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(OPEN_LLM_LEADERBOARD_V1)
    if not names:
        raise ValueError("--tasks names no task")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks names a task twice: {tasks}")
    shots: Dict[str, Optional[int]] = {name: OPEN_LLM_LEADERBOARD_V1.get(name) for name in names}
    if not num_fewshot:
        return shots

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"--num-fewshot {num_fewshot}: {text!r} is not a whole number") from None
        if value < 0:
            raise ValueError(f"--num-fewshot {num_fewshot}: shots cannot be negative")
        return value

    if "=" not in num_fewshot:
        return {name: count(num_fewshot) for name in names}
    for item in num_fewshot.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in shots:
            raise ValueError(f"--num-fewshot {num_fewshot}: {name.strip()!r} is not in --tasks ({', '.join(names)})")
        shots[name.strip()] = count(value)
    return shots


def model_identity(hf_dir: str, dtype: str) -> str:
    """A short digest of what decides the answers: the directory, its files' sizes and times, the dtype."""
    digest = hashlib.sha256(f"{os.path.realpath(hf_dir)}|{dtype}".encode())
    for name in sorted(os.listdir(hf_dir)):
        path = os.path.join(hf_dir, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _stem(output: str) -> str:
    return output[:-5] if output.endswith(".json") else output


def lm_eval_results_path(output: str) -> str:
    return _stem(output) + ".lm_eval.json"


def _lm_eval():
    require("lm_eval", "symnoise-evaluate leaderboard")
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as error:  # installed, but one of its own imports fails
        raise ValueError(f"lm-eval cannot be imported ({error}); {install_command('eval')} installs what it needs") from None
    return lm_eval


@functools.lru_cache(maxsize=None)
def _task_manager(include_path: Optional[str], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def task_manager(include_path: Optional[str], names: List[str]):
    """lm-eval's TaskManager that knows every task of ``names``: ``include_path``'s alone when
    they are all there (indexing lm-eval's own 14,000 task files takes about 9 s of CPU), else
    lm-eval's tasks with ``include_path``'s added. Unknown tasks and a missing folder: one line."""
    _lm_eval()
    if include_path is not None:
        if not os.path.isdir(include_path):
            raise ValueError(f"--include-path {include_path}: no such folder")
        local = _task_manager(include_path, False)
        if all(name in local.all_tasks for name in names):
            return local
    manager = _task_manager(include_path, True)
    for name in names:
        if name not in manager.all_tasks:
            where = f" or in {include_path}" if include_path else "; task YAMLs on disk: --include-path DIR"
            raise ValueError(f"--tasks {name}: lm-eval knows no such task or group{where}")
    return manager


def _leaves(name: str, group_subtasks: Dict[str, List[str]]) -> List[str]:
    if name not in group_subtasks:
        return [name]
    return [leaf for child in group_subtasks[name] for leaf in _leaves(child, group_subtasks)]


def _metrics(row: dict) -> Dict[str, Dict[str, Optional[float]]]:
    """lm-eval's ``metric,filter`` keys as {metric: {value, stderr}} (filter ``none`` unnamed)."""
    found: Dict[str, Dict[str, Optional[float]]] = {}
    for key, value in row.items():
        metric, comma, filter_name = key.partition(",")
        if not comma or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        name = metric if filter_name == "none" else f"{metric},{filter_name}"
        stderr = row.get(f"{metric}_stderr,{filter_name}")
        found[name] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return found


def summarize(raw: dict, shots: Dict[str, Optional[int]], settings: dict) -> dict:
    """Our summary of lm-eval's merged results: per task its metric, value, stderr, shots and
    samples; ``settings`` (model, dtype, device, batch size, limit, files) are recorded as given."""
    tasks = {}
    subtasks = raw.get("group_subtasks", {})
    for name in shots:
        row = raw["results"][name]
        metrics = _metrics(row)
        primary = PRIMARY_METRICS.get(name)
        if primary not in metrics:
            primary = next((m for m in ("acc_norm", "acc") if m in metrics), next(iter(metrics), None))
        leaves = _leaves(name, subtasks)
        counts = [raw["n-samples"][leaf] for leaf in leaves if leaf in raw.get("n-samples", {})]
        used_shots = sorted({raw["n-shot"][leaf] for leaf in leaves if leaf in raw.get("n-shot", {})})
        tasks[name] = {
            "metric": primary,
            "value": metrics[primary]["value"] if primary else None,
            "stderr": metrics[primary]["stderr"] if primary else None,
            "num_fewshot": used_shots[0] if len(used_shots) == 1 else used_shots,
            "samples": sum(c["effective"] for c in counts),
            "samples_in_task": sum(c["original"] for c in counts),
            "metrics": metrics,
        }
    return {"evaluation": "leaderboard", "tasks": tasks, **settings,
            "lm_eval_version": importlib.metadata.version("lm_eval")}


def _merge(into: dict, result: dict) -> None:
    for key, value in result.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into[key] = value


def run_leaderboard(config: LeaderboardConfig, log=print) -> dict:
    """Run the tasks, write the summary and lm-eval's results beside it; returns the summary."""
    if not os.path.isfile(os.path.join(config.hf_dir, "config.json")):
        raise ValueError(f"--hf-dir {config.hf_dir}: not a Hugging Face checkpoint (no config.json)")
    if config.dtype not in DTYPES:
        raise ValueError(f"--dtype {config.dtype}: use one of {', '.join(DTYPES)}")
    if config.limit is not None and config.limit <= 0:
        raise ValueError(f"--limit must be positive, got {config.limit}")
    lm_eval = _lm_eval()
    manager = task_manager(config.include_path, list(config.tasks))
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    gpu = torch.cuda.is_available()
    device = config.device or ("cuda" if gpu else "cpu")
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    batch_size = config.batch_size or ("auto" if device.startswith("cuda") else "8")
    cache = config.cache or os.path.join(_stem(config.output) + ".lm_eval_cache",
                                         "requests_" + model_identity(config.hf_dir, dtype))
    cache_folder = os.path.dirname(os.path.abspath(cache))
    created = cache_folder  # the outermost folder this run makes: removed if it ends before any answer
    while not os.path.isdir(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.isdir(created) else created
    os.makedirs(cache_folder, exist_ok=True)
    model = HFLM(pretrained=config.hf_dir, dtype=dtype, batch_size=batch_size, device=device)
    by_shots: Dict[Optional[int], List[str]] = {}
    for name, shots in config.tasks.items():
        by_shots.setdefault(shots, []).append(name)
    raw: dict = {}
    for shots, names in by_shots.items():
        log(f"lm-eval: {', '.join(names)} at {'the task default' if shots is None else shots} shots on {config.hf_dir}")
        try:
            result = lm_eval.evaluator.simple_evaluate(
                model=model, tasks=names, num_fewshot=shots, limit=config.limit, use_cache=cache,
                task_manager=manager, log_samples=False, batch_size=batch_size, device=device)
        except ConnectionError as error:  # a task's data set on the hub, without hub access
            if created and not raw:
                shutil.rmtree(created, ignore_errors=True)
            raise ValueError(f"--tasks {','.join(names)}: lm-eval could not load the data ({error}); without hub "
                             "access, fill HF_HOME on a machine with it and set HF_DATASETS_OFFLINE=1, or keep "
                             "task YAMLs over local files (--include-path)") from None
        _merge(raw, result)
    summary = summarize(raw, config.tasks, {
        "model": config.hf_dir, "dtype": dtype, "device": device, "batch_size": batch_size, "limit": config.limit,
        "include_path": config.include_path, "lm_eval_results": lm_eval_results_path(config.output),
        "request_cache": cache + "_rank0.db"})
    # lm-eval's own results as its writer serialises them (dtypes and other objects as text).
    write_json(json.loads(json.dumps(raw, default=handle_non_serializable)), summary["lm_eval_results"])
    write_json(summary, config.output)
    return summary
