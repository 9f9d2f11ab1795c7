"""A weighted blend in the fine-tune: the same samples under TP 2 and DP 2, the weights' mix, the
log line of what each prefix gives, and a bit-exact resume."""

import pytest

from tests.distributed import run_distributed
from tests.provenance_runs import RUN, bundled_rows, preprocess_rows

pytestmark = pytest.mark.distributed


def seen_samples(configs):
    """Train each config; per config: the losses, this rank's samples per step as
    (uid, prefix number, sample of that prefix), and the log lines."""
    import numpy as np
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config in configs:
        lines, steps = [], []
        trainer = Trainer(TrainingConfig.from_flags(**config), log=lines.append)
        starts, indices, batch_at = trainer.datasets.train.starts, trainer.datasets.train_indices, trainer.sampler.batch_at

        def recording(consumed):  # the samples of each step's batch, in the order the steps build them
            groups = batch_at(consumed)
            step = []
            for uid, position in (pair for group in groups for pair in group):
                index = int(indices[position])
                part = int(np.searchsorted(starts, index, side="right")) - 1
                step.append((uid, part, index - int(starts[part])))
            steps.append(step)
            return groups

        trainer.sampler.batch_at = recording
        out.append(([record["loss"] for record in trainer.run()], steps, lines))
        parallel_state.destroy_model_parallel()
    return out


def test_a_blend_sees_the_same_samples_under_tp2_and_dp2_in_its_weights_and_resumes_bit_exactly(provenance_run, tmp_path):
    small = preprocess_rows(bundled_rows()[:12], str(tmp_path / "small"))  # 12 samples: 12 train under --split 98,2
    a = provenance_run["a"]
    config = dict(RUN, data_path=["0.5", a, "0.5", small], load=provenance_run["megatron"], train_iters=4,
                  save_interval=None, eval_interval=None)
    tp2 = dict(config, tensor_model_parallel_size=2)
    (straight, tp_steps, lines), (first_half, _, _) = run_distributed(seen_samples, 2, [
        tp2, dict(tp2, save=str(tmp_path / "run"), exit_interval=2)])[0]
    dp_ranks = run_distributed(seen_samples, 2, [config])
    [(second_half, resumed_steps, _)] = run_distributed(seen_samples, 2, [dict(tp2, save=str(tmp_path / "run"))])[0]

    # DP 2: the two ranks' shares of each step are TP 2's step; uids are the consumed-sample indices.
    dp_steps = [r0 + r1 for r0, r1 in zip(dp_ranks[0][0][1], dp_ranks[1][0][1])]
    assert dp_steps == tp_steps and [uid for step in tp_steps for uid, _, _ in step] == list(range(32))
    assert dp_ranks[0][0][0] == pytest.approx(straight, rel=2e-5, abs=2e-5)
    # The mix after each global batch is the weights' within one sample.
    parts = [part for step in tp_steps for _, part, _ in step]
    for step in range(1, 5):
        assert abs(parts[:8 * step].count(1) - 0.5 * 8 * step) <= 1
    # The small prefix goes round more than once: its first 12 draws are each of its samples once.
    small_draws = [sample for step in tp_steps for _, part, sample in step if part == 1]
    assert len(small_draws) == 16 and sorted(small_draws[:12]) == list(range(12))
    [blend_line] = [line for line in lines if line.startswith("--data-path blend")]
    assert blend_line == (f"--data-path blend of 2 prefixes over the run's 32 samples: {a} (weight 0.5): 16 samples from "
                          f"its 196, each seen 0.08 times; {small} (weight 0.5): 16 samples from its 12, each seen 1.33 times")
    # Stopped at 2 and resumed: the same samples and the same losses, bit for bit.
    assert first_half + second_half == straight
    assert resumed_steps == tp_steps[2:]
