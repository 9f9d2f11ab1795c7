"""Checkpoints of runs with the distributed optimizer (ZeRO-1): saved, resumed exactly, resharded."""

import pytest

from tests.distributed import run_distributed
from tests.training.test_trainer import BASE, converted_tiny, data_prefix  # noqa: F401 (fixtures)

pytestmark = pytest.mark.distributed


def train_or_error(runs):
    """Each config trained in turn; its loss history, or the ValueError that refused it."""
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for kwargs in runs:
        try:
            out.append([record["loss"] for record in Trainer(TrainingConfig.from_flags(**kwargs), log=lambda message: None).run()])
        except ValueError as error:
            out.append(str(error))
        parallel_state.destroy_model_parallel()
    return out


def export(megatron_dir, hf_dir):
    from symnoise_megatron.checkpoint.convert import megatron_to_hf

    megatron_to_hf(megatron_dir, hf_dir, progress=False)
    return sorted(__import__("os").listdir(hf_dir))


def test_distributed_optimizer_checkpoints_resume_exactly_and_reshard_when_asked(data_prefix, tmp_path):  # noqa: F811
    common = dict(BASE, data_path=[data_prefix], use_distributed_optimizer=True, eval_interval=None)
    straight, stopped, stopped_full = run_distributed(train_or_error, 2, [
        dict(common, save=str(tmp_path / "straight")),
        dict(common, save=str(tmp_path / "dp"), exit_interval=2),
        dict(common, save=str(tmp_path / "full"), exit_interval=2, dist_ckpt_optim_fully_reshardable=True),
    ])[0]
    assert isinstance(straight, list) and stopped == straight[:2] and stopped_full == straight[:2]

    tp2 = dict(tensor_model_parallel_size=2)
    resumed, dp_format_under_tp2, without_it, full_format_under_tp2 = run_distributed(train_or_error, 2, [
        dict(common, save=str(tmp_path / "dp")),
        dict(common, save=str(tmp_path / "full"), **tp2, exit_interval=3) | {"save": str(tmp_path / "dp")},
        dict(common, save=str(tmp_path / "full"), use_distributed_optimizer=False),
        dict(common, save=str(tmp_path / "full"), **tp2),
    ])[0]
    assert resumed == straight[2:], "a resume must reproduce the uninterrupted run bit for bit"
    assert "changes only the data-parallel size" in dp_format_under_tp2
    assert "--dist-ckpt-optim-fully-reshardable" in dp_format_under_tp2 and "TP 1, PP 1" in dp_format_under_tp2
    assert "saved with --use-distributed-optimizer and this run is without it" in without_it
    assert full_format_under_tp2 == pytest.approx(straight[2:], rel=2e-5, abs=2e-5)

    # The model weights of such a checkpoint convert to Hugging Face as any other's.
    assert "model.safetensors" in run_distributed(export, 1, str(tmp_path / "straight"), str(tmp_path / "hf"))[0]
