"""Every benchmark under tools/bench/ runs in its smallest mode, so none rots unseen (issue 24:
bench_cpu_step.py had failed at its first worker since the trainer's config became sections,
and hid the worker's error). The device stages' dry run is in test_te_stages.py."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.distributed  # each starts processes that import torch and megatron-core


def bench(script, *args, timeout=600, **env):
    return subprocess.run([sys.executable, f"tools/bench/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=ROOT, **env))


def test_preprocess_bench(tmp_path):
    ran = bench("bench_preprocess.py", "--smallest", "--json", str(tmp_path / "figures.json"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "round 1 workers 1: ours" in ran.stdout and (tmp_path / "figures.json").exists()


def test_convert_bench(tmp_path):
    ran = bench("bench_convert.py", "--smallest", "--workdir", str(tmp_path))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "tiny shape" in ran.stdout and "ranks 1:" in ran.stdout


def test_generate_bench(smollm2_hf, tmp_path):
    ran = bench("bench_generate.py", "--smallest", "--hf-dir", smollm2_hf, "--json", str(tmp_path / "generate.json"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "batch 1:" in ran.stdout and "batch 2:" in ran.stdout and (tmp_path / "generate.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smallest mode is the interpreter's (CPU)")
def test_noise_kernel_bench():
    pytest.importorskip("triton")
    ran = bench("bench_noise_kernel.py", "--smallest")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "| symmetric | 256 | 64 | 128x64 |" in ran.stdout


def test_data_path_bench(tmp_path):
    ran = bench("bench_data_path.py", "--smallest", "--json", str(tmp_path / "data_path.json"))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "| tiny seq 64 | middle |" in ran.stdout and "| tiny | planner's step estimate |" in ran.stdout
    assert (tmp_path / "data_path.json").exists()


@pytest.fixture(scope="module")
def cpu_step_workdir(tmp_path_factory):
    """The bench's workdir: its tiny model made and converted once, by the first test."""
    return str(tmp_path_factory.mktemp("bench_cpu_step"))


def test_cpu_step_bench_against_transformers(cpu_step_workdir):
    ran = bench("bench_cpu_step.py", "--smallest", "--workdir", cpu_step_workdir)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "| transformers + NEFTune (uniform 5) |" in ran.stdout and "| symnoise-megatron tp1, uniform 5 |" in ran.stdout


def test_cpu_step_bench_shows_a_failing_workers_error(cpu_step_workdir):
    # A micro-batch larger than the global batch: the reference row's worker refuses it.
    ran = bench("bench_cpu_step.py", "--smallest", "--workdir", cpu_step_workdir, "--global-batch-size", "2",
                "--micro-batch-size", "3")
    assert ran.returncode != 0
    assert "the transformers uniform row failed" in ran.stderr
    assert "Traceback" in ran.stderr and "ValueError" in ran.stderr  # the worker's own lines
