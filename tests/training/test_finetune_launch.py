"""examples/finetune.sh's launch settings, with a torchrun that only reports what it was given:
CUDA_DEVICE_MAX_CONNECTIONS where the layout has tensor parallelism, the stop file, and the
check of whether the installed torchrun honours the save's grace time."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
REPORT = """#!/usr/bin/env bash
echo "CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset}"
echo "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-unset}"
echo "ARGS $*"
"""


@pytest.fixture()
def launch(tmp_path):
    torchrun = tmp_path / "torchrun"
    torchrun.write_text(REPORT)
    torchrun.chmod(0o755)

    def run(*flags, **variables):
        env = {key: value for key, value in os.environ.items() if key != "CUDA_DEVICE_MAX_CONNECTIONS"}
        env.update(TORCHRUN=str(torchrun), PYTHON=sys.executable, CKPT="ckpt", DATA="data", OUT=str(tmp_path / "out"), **variables)
        result = subprocess.run(["bash", "examples/finetune.sh", *flags], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        report = dict(line.split("=", 1) for line in result.stdout.splitlines() if not line.startswith("ARGS "))
        report["args"] = next(line for line in result.stdout.splitlines() if line.startswith("ARGS "))
        report["stderr"] = result.stderr
        return report

    return run


def test_one_cuda_work_queue_exactly_where_the_layout_has_tensor_parallelism(launch, tmp_path):
    assert launch(PRESET="llama2-70b-fp8", NNODES="8", MASTER_ADDR="10.0.0.1")["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    # TP 1 x PP 16 on 16 nodes, TP 1 for the 7B (their layout files)
    assert launch(PRESET="llama2-70b-fp8", NNODES="16", MASTER_ADDR="10.0.0.1")["CUDA_DEVICE_MAX_CONNECTIONS"] == "unset"
    assert launch(PRESET="llama2-7b")["CUDA_DEVICE_MAX_CONNECTIONS"] == "unset"
    assert launch(PRESET="cpu")["CUDA_DEVICE_MAX_CONNECTIONS"] == "unset"
    assert launch("--tensor-model-parallel-size", "2", PRESET="cpu")["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert launch("--tensor-model-parallel-size=2", PRESET="llama2-7b")["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    later = tmp_path / "tp2.yaml"
    later.write_text("tensor-model-parallel-size: 2\n")
    assert launch(PRESET="llama2-7b", CONFIGS=str(later))["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    later.write_text("tensor-model-parallel-size: 1\n")
    assert launch("--tensor-model-parallel-size", "2", PRESET="llama2-7b", CONFIGS=str(later))[
        "CUDA_DEVICE_MAX_CONNECTIONS"] == "1"  # the command line after the files


def test_the_stop_file_and_the_grace_time_reach_torchrun_and_an_older_torch_is_named(launch, tmp_path):
    current = launch(PRESET="cpu", STOP_FILE="runs/x/symnoise.stop", SHUTDOWN_TIMEOUT="600")
    assert "--stop-file runs/x/symnoise.stop" in current["args"]
    assert current["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "600"
    assert "WARNING" not in current["stderr"]  # this torch (2.13) reads the variable
    # A torch whose launcher does not read it (before 2.12): the same files without that line.
    old_torch = tmp_path / "old" / "torch"
    (old_torch / "distributed" / "launcher").mkdir(parents=True)
    (old_torch / "__init__.py").write_text("")
    (old_torch / "distributed" / "launcher" / "api.py").write_text("shutdown_timeout = 30\n")
    old = launch(PRESET="cpu", PYTHONPATH=str(old_torch.parent))
    assert "--stop-file" not in old["args"]
    assert f"this torch's torchrun ({old_torch}; before torch 2.12) ignores TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in old["stderr"]
    assert "WARNING" not in launch(PRESET="cpu", PYTHONPATH=str(old_torch.parent), NODE_RANK="1")["stderr"]
