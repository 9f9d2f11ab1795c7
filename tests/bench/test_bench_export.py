"""The export benchmark's smallest size runs and exports every tensor exactly (tools/bench/bench_export.py)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.distributed
def test_the_smallest_export_benchmark_runs_under_torchrun_and_is_exact(tmp_path):
    result = subprocess.run([sys.executable, "tools/bench/bench_export.py", "--smallest", "--workdir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "ranks 2:" in result.stdout and "tensors identical to the original: True" in result.stdout
    assert "x one layer" in result.stdout
