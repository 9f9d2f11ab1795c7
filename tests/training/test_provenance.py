"""The provenance record in every checkpoint, and what a resume does with it: a change of data,
seq-length, packing or split refused (or overridden and recorded), the changes a resume allows
listed, the history after two resumes, and checkpoints saved before records existed."""

import json
import os
import shutil
from importlib import metadata

import pytest

from tests.distributed import run_distributed
from tests.provenance_runs import bundled_rows, preprocess_rows

pytestmark = pytest.mark.distributed


def read_record(directory):
    with open(os.path.join(directory, "symnoise_provenance.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_every_checkpoint_records_what_the_run_was_made_of(provenance_run):
    import torch

    for iteration in (1, 2):
        record = read_record(os.path.join(provenance_run["run"], f"iter_{iteration:07d}"))
        assert record["format"] == "symnoise-megatron provenance" and record["kind"] == "training"
        assert record["iteration"] == iteration
    run = record["run"]
    # Each prefix: its weight, the meta's tokenizer and count, the files' sizes as on disk, a digest.
    for entry, prefix, weight in zip(run["data"]["train"], (provenance_run["a"], provenance_run["b"]), (0.7, 0.3)):
        with open(prefix + "_meta.json") as handle:
            meta = json.load(handle)
        assert entry["prefix"] == prefix and entry["weight"] == pytest.approx(weight)
        assert entry["samples"] == meta["samples"] and entry["tokenizer"]["sha256"] == meta["tokenizer"]["sha256"]
        assert entry["file_bytes"] == {os.path.basename(prefix) + suffix: os.path.getsize(prefix + suffix)
                                       for suffix in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx")}
        assert entry["digest"].startswith("sha256:") and len(entry["digest"]) == 71
    assert run["data"]["train"][0]["digest"] != run["data"]["train"][1]["digest"]
    assert {key: run["data"][key] for key in ("split", "seed", "seq_length", "pack_sequences", "global_batch_size",
                                              "micro_batch_size")} == {
        "split": "98,2", "seed": 1234, "seq_length": 128, "pack_sequences": False, "global_batch_size": 8, "micro_batch_size": 2}
    with open(os.path.join(provenance_run["run"], "symnoise_checkpoint.json")) as handle:
        assert run["model"] == json.load(handle)["model"]
    assert run["noise"] == {"kind": "symmetric", "alpha": 5.0, "seed": 1234, "pairing": "concat"}
    assert (run["flags"]["bf16"], run["flags"]["fp8_format"], run["flags"]["fp8_recipe"]) == (False, None, "delayed")
    assert {k: run["layout"][k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "data_parallel_size",
                                          "world_size")} == {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
                                                             "data_parallel_size": 1, "world_size": 1}
    assert run["base_checkpoint"] == {"path": provenance_run["megatron"], "iteration": "release",
                                      "converted_from": provenance_run["hf"]}
    versions = run["versions"]
    assert versions["torch"] == torch.__version__ and versions["megatron-core"] == metadata.version("megatron-core")
    assert versions["symnoise-megatron"] == metadata.version("symnoise-megatron") and "transformer-engine" not in versions
    assert len(versions["symnoise-megatron git"].split("+")[0]) == 40  # the tests run from a checkout
    [start] = record["history"]
    assert start["event"] == "start" and start["iteration"] == 0 and start["command"]
    # The manifest checksums the record with the rest of the checkpoint.
    with open(os.path.join(provenance_run["run"], "iter_0000002", "symnoise_manifest.json")) as handle:
        assert "symnoise_provenance.json" in json.load(handle)["files"]


def builds(configs):
    """Build (not train) a Trainer per config: 'built' and its log lines, or the error."""
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config in configs:
        lines = []
        try:
            Trainer(TrainingConfig.from_flags(**config), log=lines.append).close()
            out.append(("built", lines))
        except (ValueError, FileNotFoundError) as error:
            out.append(("refused", str(error)))
        parallel_state.destroy_model_parallel()
    return out


def test_a_resume_refuses_other_data_seq_length_packing_or_split_naming_both_values(provenance_run, tmp_path):
    config = dict(provenance_run["config"])
    save, a, b = config["save"], provenance_run["a"], provenance_run["b"]
    rows = bundled_rows()
    # Another data set of the same size and tokenizer; the same files moved elsewhere.
    other = preprocess_rows(rows[100:300], str(tmp_path / "other"))
    moved = str(tmp_path / "moved")
    for suffix in ("_tokens.bin", "_tokens.idx", "_loss_mask.bin", "_loss_mask.idx", "_meta.json"):
        shutil.copy(a + suffix, moved + suffix)
    # A checkpoint saved before records existed: no record, and none in its manifest.
    old = str(tmp_path / "old")
    shutil.copytree(save, old)
    os.remove(os.path.join(old, "iter_0000002", "symnoise_provenance.json"))
    manifest = os.path.join(old, "iter_0000002", "symnoise_manifest.json")
    with open(manifest) as handle:
        listed = json.load(handle)
    del listed["files"]["symnoise_provenance.json"]
    with open(manifest, "w") as handle:
        json.dump(listed, handle)
    results = run_distributed(builds, 1, [
        dict(config, data_path=["0.7", other, "0.3", b]),
        dict(config, data_path=["0.5", a, "0.5", b]),
        dict(config, seq_length=64),
        dict(config, pack_sequences=True),
        dict(config, split="90,10", seed=7),
        dict(config, data_path=["0.7", moved, "0.3", b]),
        dict(config, save=old),
    ])[0]
    other_data, weights, seq_length, packing, split, moved_data, unknown = results
    head = f"--save {save}: this run's data differs from the checkpoint's (iteration 2): "
    tail = ("; pass --override-data-config to train on with this run's (the consumed-sample count then indexes the new "
            "data's sample order)")
    assert other_data == ("refused", head + f"--data-path 0.7 {other} 0.3 {b} (checkpoint: 0.7 {a} 0.3 {b})" + tail)
    assert weights == ("refused", head + f"--data-path 0.5 {a} 0.5 {b} (checkpoint: 0.7 {a} 0.3 {b})" + tail)
    assert seq_length == ("refused", head + "--seq-length 64 (checkpoint: 128)" + tail)
    assert packing == ("refused", head + "--pack-sequences True (checkpoint: False)" + tail)
    assert split == ("refused", head + "--split 90,10 (checkpoint: 98,2); --seed 7 (checkpoint: 1234)" + tail)
    # Moved files are the same data: named in the line of allowed changes, not refused.
    assert moved_data[0] == "built", moved_data
    [allowed] = [line for line in moved_data[1] if line.startswith("resuming ")]
    assert allowed == (f"resuming {save}/iter_0000002 with changes a resume allows: --data-path 0.7 {moved} 0.3 {b} "
                       f"(checkpoint: 0.7 {a} 0.3 {b}; moved, the same content)")
    assert unknown[0] == "built"
    assert (f"provenance of {old}/iter_0000002 is unknown: it was saved without a provenance record (an older "
            "symnoise-megatron); this run's settings are recorded from iteration 2 on") in unknown[1]


def test_the_same_prefix_with_other_content_is_refused(provenance_run, tmp_path):
    # The prefix's files preprocessed again from other rows (same path, same sample count).
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(provenance_run["a"]), data)
    save = str(tmp_path / "run")
    shutil.copytree(provenance_run["run"], save)
    for name in os.listdir(os.path.join(save)):
        if name.startswith("iter_"):  # point the copy's records at the copied data
            path = os.path.join(save, name, "symnoise_provenance.json")
            text = open(path).read().replace(os.path.dirname(provenance_run["a"]), str(data))
            open(path, "w").write(text)
            manifest = os.path.join(save, name, "symnoise_manifest.json")
            listed = json.load(open(manifest))
            listed["files"]["symnoise_provenance.json"] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
            json.dump(listed, open(manifest, "w"))
    a, b = str(data / "a"), str(data / "b")
    config = dict(provenance_run["config"], save=save, data_path=["0.7", a, "0.3", b])
    assert run_distributed(builds, 1, [config])[0][0][0] == "built"
    preprocess_rows(bundled_rows()[50:250], a)
    [(verdict, message)] = run_distributed(builds, 1, [config])[0]
    assert verdict == "refused", message
    assert message.startswith(f"--save {save}: this run's data differs from the checkpoint's (iteration 2): --data-path "
                              f"0.7 {a} 0.3 {b}: other content: {a} now has digest ")
    was = read_record(os.path.join(save, "iter_0000002"))["run"]["data"]["train"][0]["digest"][len("sha256:"):][:12]
    assert message.endswith(f" and 200 samples (checkpoint: digest {was}, 200 samples); pass --override-data-config "
                            "to train on with this run's (the consumed-sample count then indexes the new data's sample order)")


def _sha256(path):
    from symnoise_megatron.common.files import sha256_of_file

    return sha256_of_file(path)


def trains(configs):
    """Train each config in turn: the losses and the log lines of each."""
    from megatron.core import parallel_state

    from symnoise_megatron.training.arguments import TrainingConfig
    from symnoise_megatron.training.loop import Trainer

    out = []
    for config in configs:
        lines = []
        out.append(([r["loss"] for r in Trainer(TrainingConfig.from_flags(**config), log=lines.append).run()], lines))
        parallel_state.destroy_model_parallel()
    return out


def test_allowed_changes_the_override_and_the_history_after_two_resumes(provenance_run, tmp_path):
    save = str(tmp_path / "run")
    shutil.copytree(provenance_run["run"], save)
    base = dict(provenance_run["config"], save=save)
    first = dict(base, train_iters=3, global_batch_size=16, lr=1e-3, log_interval=2, override_opt_param_scheduler=True)
    # Other data (another sample count, so another sample order) and another --seq-length, overridden.
    other = preprocess_rows(bundled_rows()[:150], str(tmp_path / "other"))
    b = provenance_run["b"]
    second = dict(first, train_iters=4, seq_length=64, data_path=["0.7", other, "0.3", b], override_data_config=True)
    (losses3, lines3), (losses4, lines4) = run_distributed(trains, 1, [first, second])[0]
    assert len(losses3) == len(losses4) == 1  # each resume trained on
    [allowed] = [line for line in lines3 if line.startswith("resuming ")]
    assert allowed == (f"resuming {save}/iter_0000002 with changes a resume allows: --global-batch-size 16 (checkpoint: 8), "
                       "--train-iters 3 (checkpoint: 2), --lr 0.001 (checkpoint: 0.002), --log-interval 2 (checkpoint: 1)")
    assert not [line for line in lines3 if line.startswith("WARNING")]
    a = provenance_run["a"]
    assert [line for line in lines4 if line.startswith("WARNING")] == [
        f"WARNING: --save {save}: --data-path 0.7 {other} 0.3 {b} (checkpoint: 0.7 {a} 0.3 {b}) (--override-data-config: "
        "training on with this run's)",
        f"WARNING: --save {save}: --seq-length 64 (checkpoint: 128) (--override-data-config: training on with this run's)"]
    record = read_record(os.path.join(save, "iter_0000004"))
    start, resumed, overridden = record["history"]
    assert (start["event"], start["iteration"]) == ("start", 0)
    assert (resumed["event"], resumed["iteration"]) == ("resume", 2) and "overridden" not in resumed
    assert resumed["changed"] == {"--global-batch-size": [8, 16], "--train-iters": [2, 3], "--lr": [0.002, 0.001],
                                  "--log-interval": [1, 2]}
    assert (overridden["event"], overridden["iteration"]) == ("resume", 3)
    assert overridden["changed"] == {"--data-path": [f"0.7 {a} 0.3 {b}", f"0.7 {other} 0.3 {b}"],
                                     "--seq-length": [128, 64], "--train-iters": [3, 4]}
    assert overridden["overridden"] == ["--data-path", "--seq-length"]
    assert record["run"]["data"]["seq_length"] == 64 and record["run"]["data"]["global_batch_size"] == 16
    assert record["run"]["data"]["train"][0]["prefix"] == other
