"""The Transformer Engine device stages' pure parts, and that they skip cleanly without a GPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
    assert list(r) == ["device", "spec", "precision", "noise", "pairing", "options", "layers", "seq_length", "step_s",
                       "tokens_per_s", "processed_tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_gb",
                       "planner_memory_gb"]
    assert r["options"] == "default" and row(options="cuda-graphs")["options"] == "cuda-graphs"
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
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("DEVICE_DRY_RUN", None)
    result = subprocess.run(["bash", "tools/bench/device_session.sh", "te", "te_step", "te_parity", "fp8_noise", "step_bench"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "te_smoke: SKIPPED, no CUDA device" in (tmp_path / "te.log").read_text()
    for name in ("te_step", "te_parity", "fp8_noise", "step_bench"):
        assert f"== {name} skipped: the te stage did not pass" in result.stdout
    for script in ("te_step.py", "te_parity.py", "fp8_noise_te.py", "bench_train_step_gpu.py"):
        ran = subprocess.run([sys.executable, f"tools/bench/{script}"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert ran.returncode == te_results.SKIPPED == 0 and "SKIPPED" in ran.stdout, script


def test_the_device_plan_fits_one_call():
    """Issue 24: the default stages' limits add up to at most 540 s (a call may run 600 s, and the
    wheels install before the stages), in the issue's order."""
    import re

    script = open(os.path.join(ROOT, "tools", "bench", "device_session.sh")).read()
    default = re.search(r"stages=\((env[^)]*)\)", script).group(1).split()
    assert default == ["env", "te", "te_step", "fp8_noise", "te_parity", "step_bench"]
    limits = {name: int(limit) for name, limit in re.findall(r"stage (\w+) (\d+) ", script)}
    assert sum(limits[name] for name in default) <= 540, limits
    assert 'run(carry=[".whl", ".te"], timeout_s=600, command="bash tools/bench/device_session.sh")' in script


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's")
def test_the_dry_run_runs_every_stage_of_the_plan_on_the_cpu(tmp_path):
    """DEVICE_DRY_RUN=1: every stage's own Python at its smallest shapes, so a script error shows
    here rather than in the GPU's minutes. Each stage writes its JSON (to $OUT only)."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, DEVICE_DRY_RUN="1")
    result = subprocess.run(["bash", "tools/bench/device_session.sh"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    for name in ("env", "te", "te_step", "fp8_noise", "te_parity", "step_bench"):
        assert f"== {name} rc=0" in result.stdout, name
    assert "megatron-core" in (tmp_path / "env.log").read_text()
    written = {name: json.loads((tmp_path / name).read_text())
               for name in ("te_step.json", "fp8_noise_te.json", "te_parity.json", "te_step_bench.json")}
    assert written["te_step.json"]["passed"] and written["te_step.json"]["dry_run"]
    assert len(written["te_step.json"]["steps"]) == 2
    assert written["te_parity.json"]["complete"] and written["te_parity.json"]["dry_run"]
    assert set(written["te_parity.json"]["checks"]) == {"logits", "packed_sample_loss", "train_loss_padded",
                                                         "train_loss_packed", "noise_gradients"}
    # The performance settings CPU can run (issue 26); CUDA graphs and TP overlap are left out with the reason.
    assert {(r["precision"], r["noise"], r["pairing"], r["options"]) for r in written["te_step_bench.json"]} == {
        ("bf16", "none", "none", "default"), ("bf16", "uniform", "none", "default"),
        ("bf16", "symmetric", "concat", "default"), ("bf16", "symmetric", "microbatch", "default"),
        ("bf16", "symmetric", "concat", "static-shapes"), ("bf16", "symmetric", "concat", "no-grad-fusion"),
        ("bf16", "symmetric", "concat", "overlap")}
    bench_log = (tmp_path / "step_bench.log").read_text()
    assert "bf16 symmetric (concat) [cuda-graphs]: needs a GPU with Transformer Engine" in bench_log
    assert "bf16 symmetric (concat) [tp-overlap]: needs two GPUs" in bench_log
    assert written["fp8_noise_te.json"]["dry_run"] and written["fp8_noise_te.json"]["rows"]
    # A dry run never touches the measured figures in the repository.
    for path in Path(te_results.RESULTS_DIR).glob("*.json"):
        payload = json.loads(path.read_text())
        rows = payload if isinstance(payload, list) else [payload]
        assert not any(row.get("dry_run") is True or row.get("device") == "cpu" for row in rows), path


def test_the_step_bench_measures_the_goals_first_then_the_performance_settings_and_stops_within_its_budget():
    from tools.bench.bench_train_step_gpu import PERFORMANCE, expected_seconds, ordered_settings

    goals = [("bf16", "none", "none", "default"), ("bf16", "symmetric", "concat", "default"),
             ("fp8-tensorwise", "none", "none", "default"), ("fp8-tensorwise", "symmetric", "concat", "default")]
    order = ordered_settings(["bf16", "fp8-tensorwise", "fp8-delayed"],
                             ["none:none", "uniform:none", "symmetric:concat", "symmetric:microbatch"])
    assert order[:4] == goals and len(order) == 12 and len(set(order)) == 12
    tuned = ordered_settings(["bf16", "fp8-tensorwise", "fp8-delayed"],
                             ["none:none", "uniform:none", "symmetric:concat", "symmetric:microbatch"], list(PERFORMANCE))
    # Issue 26: a row per performance setting, right after the issue-24 goals' rows, beside BF16 symmetric (concat).
    assert tuned[:4] == goals and tuned[4:9] == [("bf16", "symmetric", "concat", name) for name in PERFORMANCE]
    assert set(PERFORMANCE) == {"static-shapes", "cuda-graphs", "no-grad-fusion", "overlap", "tp-overlap"}
    assert tuned[9:] == order[4:]
    assert ordered_settings(["bf16"], ["uniform:none"]) == [("bf16", "uniform", "none", "default")]
    assert ordered_settings(["fp8-delayed"], ["none:none"], ["overlap"]) == [("fp8-delayed", "none", "none", "default")]
    walls = {("bf16", "none", "none", "default"): 20.0}
    assert expected_seconds(walls, "symmetric") == 40.0 and expected_seconds(walls, "uniform") == 20.0
    walls[("bf16", "symmetric", "concat", "default")] = 30.0
    assert expected_seconds(walls, "symmetric") == 30.0


def test_each_performance_setting_is_a_valid_fine_tune_configuration_that_turns_its_flags_on():
    """The rows measure what they say: the flags of each reach the trainer's config (validated as
    a run would be), static shapes on wherever TP overlap or CUDA graphs are."""
    from symnoise_megatron.training.arguments import TrainingConfig
    from tools.bench.bench_train_step_gpu import PERFORMANCE

    for name, flags in PERFORMANCE.items():
        config = TrainingConfig.from_flags(data_path=["unused"], train_iters=1, **flags)
        config.validate_flags()
        performance = config.performance
        assert performance.uses_static_shapes == (name in ("static-shapes", "cuda-graphs", "tp-overlap")), name
    assert TrainingConfig.from_flags(**PERFORMANCE["no-grad-fusion"]).performance.gradient_accumulation_fusion is False
    assert TrainingConfig.from_flags(**PERFORMANCE["overlap"]).performance.overlap_param_gather


def test_te_parity_fails_the_noise_check_when_the_kernel_never_ran():
    from tools.bench.te_parity import checks_of

    ran = {"noise_gradients": {"noise_gradients": 0.0, "fused_kernel_calls": 2, "dry_run": False}}
    assert checks_of(ran)["noise_gradients"]["passed"]
    bypassed = {"noise_gradients": {"noise_gradients": 0.0, "fused_kernel_calls": 0, "dry_run": False}}
    assert not checks_of(bypassed)["noise_gradients"]["passed"]
    cut = {"noise_gradients": {"noise_gradients": 1.0, "fused_kernel_calls": 2, "dry_run": False}}
    assert not checks_of(cut)["noise_gradients"]["passed"]  # a zero gradient on the fused path


def test_rows_of_a_later_call_replace_only_the_settings_it_measured():
    from tools.bench.te_results import merge_rows

    earlier = [row(precision="bf16", noise="none", pairing="none", copies=1, step_s=1.0),
               row(precision="fp8-delayed", step_s=5.0)]
    latest = [row(precision="bf16", noise="none", pairing="none", copies=1, step_s=2.0)]
    merged = merge_rows(earlier, latest)
    assert [(r["precision"], r["step_s"]) for r in merged] == [("fp8-delayed", 5.0), ("bf16", 2.0)]
    # A performance setting is a row of its own; a row written before options existed ran the defaults.
    old = {k: v for k, v in row(step_s=7.0).items() if k != "options"}
    merged = merge_rows([old, row(options="cuda-graphs", step_s=3.0)], [row(step_s=4.0)])
    assert [(r["options"], r["step_s"]) for r in merged] == [("cuda-graphs", 3.0), ("default", 4.0)]
