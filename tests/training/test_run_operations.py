"""What a long run on a cluster needs besides training: checkpoint retention (--keep-last,
--keep-every), a stop file (--stop-file) and the collectives' timeout (--distributed-timeout-minutes).

The retention rules are checked on checkpoint folders made by hand (every case, instantly); the
fine-tune's use of them on real saves, with a crash between a save and the removal."""

import json
import os
import socket

import pytest

from symnoise_megatron.checkpoint import paths
from symnoise_megatron.training.checkpointing import MANIFEST
from symnoise_megatron.training.retention import plan_retention, remove_old_checkpoints
from tests.distributed import run_distributed


def fake_checkpoint(root, iteration, complete=True, suffix=""):
    """An iter_N folder with one shard and a manifest listing it (at the wrong size when not complete)."""
    directory = paths.iteration_dir(str(root), iteration) + suffix
    os.makedirs(directory)
    with open(os.path.join(directory, "__0_0.distcp"), "wb") as handle:
        handle.write(b"x" * 10)
    with open(os.path.join(directory, MANIFEST), "w") as handle:
        json.dump({"algorithm": "sha256", "files": {"__0_0.distcp": {"bytes": 10 if complete else 11, "sha256": ""}}},
                  handle)


def run_folder(root, iterations, latest, damaged=()):
    for iteration in iterations:
        fake_checkpoint(root, iteration, complete=iteration not in damaged)
    paths.write_tracker(str(root), latest)
    return str(root)


def names(*iterations):
    return [f"iter_{n:07d}" for n in iterations]


def test_keep_last_keeps_the_newest_good_checkpoints_and_keep_every_the_milestones(tmp_path):
    plain = run_folder(tmp_path / "plain", range(1, 6), latest=5)
    assert plan_retention(plain, keep_last=2).remove == names(1, 2, 3)
    assert plan_retention(plain, keep_last=1, keep_every=2).keep == names(2, 4, 5)
    # A damaged checkpoint takes no place among the newest: the two kept are good ones.
    damaged = run_folder(tmp_path / "damaged", range(1, 6), latest=5, damaged={4})
    assert plan_retention(damaged, keep_last=2).keep == names(3, 5)
    removed = remove_old_checkpoints(damaged, keep_last=2, log=lambda m: None)
    assert removed == names(1, 2, 4) and sorted(os.listdir(damaged)) == names(3, 5) + [paths.TRACKER]


def test_nothing_is_removed_unless_the_latest_checkpoint_matches_its_manifest(tmp_path):
    root = run_folder(tmp_path / "run", range(1, 4), latest=3, damaged={3})
    warnings = []
    assert remove_old_checkpoints(root, keep_last=1, log=warnings.append) == []
    assert sorted(os.listdir(root)) == names(1, 2, 3) + [paths.TRACKER]
    assert "does not match its manifest: no older checkpoint removed" in warnings[0]


def test_leftovers_are_removed_and_newer_folders_left_alone(tmp_path):
    root = run_folder(tmp_path / "run", [2, 4, 6], latest=4)  # 6: newer than the tracker (rolled back by hand)
    fake_checkpoint(root, 1, suffix=".partial")   # a save that crashed before an older one
    fake_checkpoint(root, 5, suffix=".partial")   # newer than the tracker: the run may save it again
    fake_checkpoint(root, 3, suffix=".removing")  # a removal that crashed halfway
    fake_checkpoint(root, 2, suffix=".removing")  # ... of the same iteration that is removed again now
    remove_old_checkpoints(root, keep_last=1, log=lambda m: None)
    assert sorted(os.listdir(root)) == ["iter_0000004", "iter_0000005.partial", "iter_0000006", paths.TRACKER]


def test_retention_flags_are_checked_before_any_work():
    from symnoise_megatron.training.arguments import CheckpointOptions

    for options, message in ((dict(keep_last=2), "--keep-last needs --save"),
                             (dict(save="run", keep_last=0), "--keep-last must be at least 1"),
                             (dict(save="run", keep_every=100), "--keep-every names checkpoints to keep besides "
                                                                "--keep-last's: give --keep-last too")):
        with pytest.raises(ValueError, match=message):
            CheckpointOptions(**options).validate()
    CheckpointOptions(save="run", keep_last=2, keep_every=1000).validate()


# The fine-tune's saves --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(converted tiny LLaMA, preprocessed bundled data) for short fine-tunes."""
    from symnoise_megatron.data import BUNDLED_INSTRUCTIONS, BUNDLED_TOKENIZER
    from symnoise_megatron.data.preprocess import PreprocessConfig, preprocess
    from symnoise_megatron.data.tokenizer import TokenizerSpec
    from tests.checkpoint.conftest import make_hf_model
    from tests.training.test_trainer import convert

    root = tmp_path_factory.mktemp("tiny_ops")
    hf_dir = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                                         max_position_embeddings=256), str(root / "hf"))
    run_distributed(convert, 1, hf_dir, str(root / "megatron"))
    prefix = str(root / "data" / "bundled")
    preprocess(PreprocessConfig([BUNDLED_INSTRUCTIONS], prefix, TokenizerSpec(model_file=BUNDLED_TOKENIZER),
                                seq_length=129, progress=False))
    return dict(load=str(root / "megatron"), finetune=True, data_path=[prefix], global_batch_size=4, micro_batch_size=2,
                seq_length=128, lr=2e-3, lr_warmup_fraction=0.0, log_interval=1, noise_kind="symmetric",
                noise_alpha=5.0, save_interval=1)


def train_crashing_in_removal(config, crash_at):
    """Train, dying (as a killed node does) when the save of ``crash_at`` is published and its
    older checkpoints are about to be removed; returns the log otherwise."""
    from symnoise_megatron.training import retention
    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    remove = retention.remove_old_checkpoints

    def crashing(root, *args, **kwargs):
        if paths.read_tracker(root) == crash_at:
            os._exit(1)
        return remove(root, *args, **kwargs)

    retention.remove_old_checkpoints = crashing
    messages = []
    Trainer(TrainingConfig.from_flags(**config), log=messages.append).run()
    return messages


@pytest.mark.distributed
def test_a_crash_between_a_save_and_the_removal_keeps_the_new_checkpoint_and_the_next_save_removes(tiny_run, tmp_path):
    save = tmp_path / "run"
    config = dict(tiny_run, save=str(save), train_iters=4, keep_last=1)
    with pytest.raises(RuntimeError, match="rank 0 of train_crashing_in_removal died"):
        run_distributed(train_crashing_in_removal, 1, config, 3)
    # Iteration 1 went at the save of 2; the save of 3 was published, then the process died.
    assert paths.read_tracker(str(save)) == 3
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == names(2, 3)
    # The same command resumes from 3 and, with a milestone every 2 iterations, removes only 3 at the save of 4.
    messages = run_distributed(train_crashing_in_removal, 1, dict(config, keep_every=2), None)[0]
    assert f"resumed from {save}/iter_0000003 at iteration 3" in messages
    assert any(m.startswith(f"removed iter_0000003 from {save} (--keep-last 1, --keep-every 2; kept iter_0000002, "
                            "iter_0000004)") for m in messages), messages
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == names(2, 4)
    assert paths.read_tracker(str(save)) == 4


def stop_file_run(config, stop_file):
    """The fine-tune started as torchrun starts it (the harness's process group dropped first), with a
    stop file already there; returns the log and the timeouts of its process groups, in minutes."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    dist.destroy_process_group()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    open(stop_file, "w").close()
    messages = []
    trainer = Trainer(TrainingConfig.from_flags(**config), log=messages.append)
    timeouts = [group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
                for group in (dist.group.WORLD, parallel_state.get_tensor_model_parallel_group(),
                              parallel_state.get_data_parallel_group())]
    trainer.run()
    return messages, timeouts


@pytest.mark.distributed
def test_a_stop_file_saves_and_stops_and_the_timeout_reaches_every_process_group(tiny_run, tmp_path):
    save, stop_file = tmp_path / "run", tmp_path / "stop"
    config = dict(tiny_run, save=str(save), train_iters=4, save_interval=None, distributed_timeout_minutes=7,
                  stop_file=str(stop_file))
    messages, timeouts = run_distributed(stop_file_run, 1, config, str(stop_file))[0]
    assert f"exiting at iteration 1 (stop file {stop_file})" in messages
    assert paths.read_tracker(str(save)) == 1 and not stop_file.exists()  # removed: a rerun does not stop at once
    assert timeouts == [7, 7, 7]
