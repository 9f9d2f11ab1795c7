"""Converted checkpoints against transformers: logits under TP 1/2, PP 2, TP2 x PP2."""

import pytest

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
    return out


@pytest.fixture(scope="module")
def reports(converted):
    results = {}
    for layout, (tp, pp) in LAYOUTS.items():
        per_rank = run_distributed(compare_all, tp * pp, converted, tp, pp)
        results[layout] = {name: next((r[name] for r in per_rank if r[name] is not None), None) for name in HF_MODELS}
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
