"""Converted checkpoints against transformers: logits under TP 1/2, PP 2, TP2 x PP2."""

import pytest
import torch

from tests.checkpoint.conftest import HF_MODELS
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "tp2_pp2": (2, 2)}
TOLERANCE = 1e-4  # fp32


def compare_all(pairs, tp, pp):
    from symnoise_megatron.checkpoint.verify import compare_with_transformers
    from symnoise_megatron.model.parallelism import ParallelConfig
    from symnoise_megatron.runtime.parallel import initialize_distributed

    parallel = ParallelConfig(tp, pp)
    initialize_distributed(parallel)
    out = {}
    for name, (hf_dir, megatron_dir) in pairs.items():
        try:
            out[name] = compare_with_transformers(hf_dir, megatron_dir, parallel, batch=2, seq=48)
        except ValueError as error:
            out[name] = str(error)
    if tp == pp == 1:
        out["on_another_device"] = on_another_device(*pairs["llama_gqa_untied_32001"], parallel)
    return out


def on_another_device(hf_dir, megatron_dir, parallel):
    """Where the rank's device is not the CPU (a GPU: never in CI), both models and the tokens must
    go there. Stand-in: the meta device, on which every forward runs without data, so the check
    stops where the logits are copied back. Meanwhile every module call records the devices of
    its parameters and tensor inputs: (the error, the devices seen)."""
    from unittest import mock

    from megatron.core import parallel_state

    from symnoise_megatron.checkpoint.verify import compare_with_transformers
    from symnoise_megatron.runtime import parallel as parallel_module

    def fresh_memory_buffer():  # megatron-core's scratch buffers, made on the current device when first asked
        parallel_state.destroy_global_memory_buffer()
        parallel_state._set_global_memory_buffer()

    seen = set()

    def record(module, inputs):
        seen.update(str(t.device) for t in [*module.parameters(recurse=False), *inputs] if isinstance(t, torch.Tensor))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    # The stand-in is the "current CUDA device" too, where megatron-core creates rope's frequencies.
    fresh_memory_buffer()
    try:
        with mock.patch.object(parallel_module, "compute_device", lambda: torch.device("meta")), \
                mock.patch("torch.cuda.current_device", lambda: "meta"):
            compare_with_transformers(hf_dir, megatron_dir, parallel, batch=2, seq=48)
        error = "ran to the end"
    except (RuntimeError, NotImplementedError) as raised:
        error = str(raised)
    finally:
        hook.remove()
        fresh_memory_buffer()
    return error, seen


@pytest.fixture(scope="module")
def reports(converted):
    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        per_rank = run_distributed(compare_all, tp * pp, converted, tp, pp)
        results[layout] = {name: next((r[name] for r in per_rank if r.get(name) is not None), None)
                           for name in list(HF_MODELS) + ["on_another_device"]}
    return results


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", HF_MODELS)
def test_logits_match_transformers(reports, layout, name):
    report = reports[layout][name]
    if name == "llama_one_kv_head" and LAYOUTS[layout][0] > 1:
        assert isinstance(report, str) and "key/value groups" in report  # 1 KV head cannot split over TP 2
        return
    assert report.max_abs_diff <= TOLERANCE, report
    assert report.megatron_loss == pytest.approx(report.hf_loss, abs=1e-5)


def test_verify_runs_both_models_on_the_ranks_device(reports):
    """Issue 24: on a GPU machine the inputs and transformers' model stayed on the CPU while
    megatron's was on CUDA. On the stand-in device everything runs until the comparison copies
    the logits back."""
    error, devices = reports["tp1"]["on_another_device"]
    assert "Cannot copy out of meta tensor" in error and devices == {"meta"}, (error, devices)


def test_the_verdict_is_relative_to_the_logits_and_looser_under_tf32():
    from symnoise_megatron.checkpoint.verify import FP32_TOLERANCE, TF32_TOLERANCE, ParityReport

    report = ParityReport(max_abs_diff=3e-4, max_rel_diff=0.1, max_abs_logit=20.0, megatron_loss=1.0, hf_loss=1.0,
                          tokens=96)
    assert report.scaled_diff == pytest.approx(1.5e-5) and report.passed() and FP32_TOLERANCE == 2e-5
    assert not ParityReport(**dict(vars(report), max_abs_logit=10.0)).passed()
    loose = ParityReport(**dict(vars(report), max_abs_diff=0.1, tf32=True))
    assert loose.passed() and TF32_TOLERANCE == 1e-2 and not loose.passed(1e-3)


@pytest.mark.parametrize("name", ["llama_gqa_untied_32001", "opt"])
def test_one_conversion_gives_the_same_loss_under_every_layout(reports, name):
    losses = [reports[layout][name].megatron_loss for layout in LAYOUTS]
    assert max(losses) - min(losses) < 1e-5


def test_a_model_trained_from_a_preset_and_its_export_are_the_same_model(tmp_path):
    # Presets leave num_query_groups None (one per head); config.json always states the KV heads.
    import json

    from symnoise_megatron.checkpoint.hf_config import hf_config_from_model
    from symnoise_megatron.checkpoint.verify import check_same_model
    from symnoise_megatron.model.config import PRESETS

    for name in ("tiny", "llama2-7b"):
        (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(PRESETS[name])))
        check_same_model(str(tmp_path), "run", PRESETS[name])
    with pytest.raises(ValueError, match="different models: num_layers 2 vs 32"):
        check_same_model(str(tmp_path), "run", PRESETS["tiny"])


def test_verify_refuses_two_different_models_naming_what_differs(converted, tmp_path, capsys):
    from symnoise_megatron.commands.verify import main

    names = list(converted)
    hf_dir, _ = converted["opt"]
    _, megatron_dir = converted[next(name for name in names if name.startswith("llama"))]
    assert main(["--hf-dir", hf_dir, "--megatron-dir", megatron_dir]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --megatron-dir {megatron_dir} and --hf-dir {hf_dir} are different models: ")
    assert "architecture llama vs opt" in err and err.count("\n") == 1
