"""The Transformer Engine device stages' pure parts, and that they skip cleanly without a GPU."""

import math
import os
import subprocess
import sys

import pytest
import torch

from tools.bench import te_results
from tools.bench.te_results import check, copies_differ_and_kept, parity_report, step_bench_row

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def row(**overrides):
    fields = dict(device="NVIDIA H100 80GB HBM3", spec="te", precision="fp8-tensorwise", noise="symmetric",
                  pairing="concat", layers=12, seq_length=2048, step_s=2.0, data_tokens=8 * 2048, copies=2,
                  flops_per_token=1e10, peak_tflops=1978.0, peak_memory_gb=60.0, planner_memory_gb=55.0)
    fields.update(overrides)
    return step_bench_row(**fields)


def test_step_bench_rows_have_exactly_the_issues_keys_and_count_both_copies():
    r = row()
    assert list(r) == ["device", "spec", "precision", "noise", "pairing", "layers", "seq_length", "step_s",
                       "tokens_per_s", "processed_tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gb",
                       "planner_memory_gb"]
    assert r["tokens_per_s"] == 8192 and r["processed_tokens_per_s"] == 16384
    assert r["tflops_per_gpu"] == pytest.approx(16384 * 1e10 / 1e12)
    assert r["mfu"] == pytest.approx(163.84 / 1978.0)
    single = row(noise="uniform", pairing="none", copies=1, precision="bf16", peak_tflops=None)
    assert single["processed_tokens_per_s"] == single["tokens_per_s"] == 8192 and single["mfu"] is None


@pytest.mark.parametrize("bad", [dict(noise="uniform", pairing="concat", copies=1), dict(pairing="none"),
                                 dict(copies=1), dict(precision="fp8"), dict(spec="TE")])
def test_step_bench_rows_refuse_inconsistent_labels(bad):
    with pytest.raises(ValueError):
        row(**bad)


def test_precision_labels_map_to_the_recipe_flags():
    assert [te_results.fp8_recipe(p) for p in te_results.PRECISIONS] == [None, "delayed", "tensorwise", "blockwise"]


def test_tolerance_verdicts():
    assert check(0.01, 0.02)["passed"] and not check(0.03, 0.02)["passed"]
    assert not check(float("nan"), 0.02)["passed"] and not check(math.inf, 0.02)["passed"]
    report = parity_report({"logits": check(0.01, 0.02), "train_loss": check(0.5, 0.01)}, device="d")
    assert report["tolerances"] == {"logits": 0.02, "train_loss": 0.01} and report["measured"]["train_loss"] == 0.5
    assert report["passed"] is False
    assert parity_report({"logits": check(0.01, 0.02)})["passed"] is True
    assert parity_report({})["passed"] is False


def test_a_missing_training_run_fails_the_loss_check():
    from tools.bench.te_parity import relative_loss_gap

    assert relative_loss_gap([2.0, 1.0], [2.0, 1.1]) == pytest.approx(0.1 / 1.1)
    assert not check(relative_loss_gap([2.0], [2.0, 1.0]), 0.01)["passed"]


def test_the_te_cast_figures_equal_the_simulations_with_its_rounding():
    """fp8_noise_te draws the simulation's noise and measures it the same way: with torch's
    E4M3 round trip in place of TE's cast it reproduces simulate()'s figures exactly."""
    from symnoise_megatron.noise.fp8_resolution import gaussian_embeddings, quantize_e4m3, rms_norm, simulate
    from tools.bench.fp8_noise_te import symmetric_noise

    rows = gaussian_embeddings(64, 256, 0.02)
    differs = []
    for alpha, length in ((5, 2 ** 20), (15, 512)):
        noise = symmetric_noise(64, 256, alpha, length)
        plus, minus, clean = rms_norm(rows + noise), rms_norm(rows - noise), rms_norm(rows)
        differ, kept = copies_differ_and_kept(plus, minus, quantize_e4m3(plus, like=clean), quantize_e4m3(minus, like=clean))
        simulated = simulate(rows, alpha, length)
        assert (differ, kept) == pytest.approx((simulated.copies_differ, simulated.noise_kept), abs=1e-6)
        differs.append(differ)
    assert 0 < differs[0] < 0.9 and differs[1] > 0.99  # a swallowed and a kept case


def test_bench_means_numbers_and_keeps_labels():
    from tools.bench.bench_train_step_gpu import mean_rows

    merged = mean_rows([row(step_s=1.0), row(step_s=3.0)])
    assert merged["step_s"] == 2.0 and merged["layers"] == 12 and merged["precision"] == "fp8-tensorwise"
    assert merged["tokens_per_s"] == pytest.approx((8192 * 2 + 8192 * 2 / 3) / 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_device_session_skips_the_te_stages_without_a_gpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", "tools/bench/device_session.sh", "te", "te_parity", "fp8_noise", "step_bench"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "te_smoke: SKIPPED, no CUDA device" in (tmp_path / "te.log").read_text()
    for name in ("te_parity", "fp8_noise", "step_bench"):
        assert f"== {name} skipped: the te stage did not pass" in result.stdout
    for script in ("te_parity.py", "fp8_noise_te.py", "bench_train_step_gpu.py"):
        ran = subprocess.run([sys.executable, f"tools/bench/{script}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == te_results.SKIPPED == 0 and "SKIPPED" in ran.stdout, script


def test_rows_of_a_later_call_replace_only_the_settings_it_measured():
    from tools.bench.te_results import merge_rows

    earlier = [row(precision="bf16", noise="none", pairing="none", copies=1, step_s=1.0),
               row(precision="fp8-delayed", step_s=5.0)]
    latest = [row(precision="bf16", noise="none", pairing="none", copies=1, step_s=2.0)]
    merged = merge_rows(earlier, latest)
    assert [(r["precision"], r["step_s"]) for r in merged] == [("fp8-delayed", 5.0), ("bf16", 2.0)]
