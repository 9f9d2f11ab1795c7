"""Conversion never mixes old files with new ones, never touches a training run's checkpoints,
and names what it refuses: a used --save-dir, a run's iter_* folders, a corrupted HF shard, a
megatron folder that holds only an unfinished save."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoint.conftest import make_hf_model
from tests.distributed import run_distributed

pytestmark = pytest.mark.distributed


def _error(call):
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def training_run(directory, iterations=(4, 8), latest="8"):
    """A --save folder as training leaves it (the folders' contents do not matter here)."""
    os.makedirs(directory)
    for iteration in iterations:
        os.makedirs(os.path.join(directory, f"iter_{iteration:07d}"))
    with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(latest)
    return directory


def conversions(hf_dir, other_hf_dir, megatron_dir, root):
    """Every conversion of these tests on one rank; what each did or refused."""
    from symnoise_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf

    out = {}
    hf_to_megatron(hf_dir, megatron_dir, progress=False)
    # megatron-to-hf into a folder holding another model's single model.safetensors and a note.
    used = os.path.join(root, "used-hf")
    shutil.copytree(other_hf_dir, used)
    open(os.path.join(used, "notes.txt"), "w").close()
    out["hf refused"] = _error(lambda: megatron_to_hf(megatron_dir, used, max_shard_bytes=60_000, progress=False))
    out["hf kept after refusal"] = sorted(os.listdir(used))
    megatron_to_hf(megatron_dir, used, max_shard_bytes=60_000, progress=False, overwrite=True)
    out["hf overwritten"] = sorted(os.listdir(used))
    out["hf siblings"] = sorted(os.listdir(root))
    # A training run's folder, as the target of either direction.
    run = training_run(os.path.join(root, "run"))
    out["hf into run"] = _error(lambda: megatron_to_hf(megatron_dir, run, progress=False, overwrite=True))
    out["megatron into run"] = _error(lambda: hf_to_megatron(hf_dir, run, progress=False, overwrite=True))
    out["run after"] = sorted(os.listdir(run))
    with open(os.path.join(run, "latest_checkpointed_iteration.txt")) as handle:
        out["run tracker after"] = handle.read()
    moved_on = training_run(os.path.join(root, "moved-on"), iterations=(), latest="12")
    out["megatron into moved-on run"] = _error(lambda: hf_to_megatron(hf_dir, moved_on, progress=False))
    # An earlier conversion of another model: replaced only with --overwrite, stale assets gone.
    earlier = os.path.join(root, "earlier")
    hf_to_megatron(other_hf_dir, earlier, progress=False)
    open(os.path.join(earlier, "hf_assets", "tokenizer.model"), "w").close()
    out["megatron refused"] = _error(lambda: hf_to_megatron(hf_dir, earlier, progress=False))
    hf_to_megatron(hf_dir, earlier, progress=False, overwrite=True)
    out["megatron overwritten assets"] = sorted(os.listdir(os.path.join(earlier, "hf_assets")))
    with open(os.path.join(earlier, "symnoise_checkpoint.json")) as handle:
        out["megatron overwritten from"] = json.load(handle)["converted_from"]
    # --overwrite of a folder that holds the source.
    out["overwrite source"] = _error(lambda: megatron_to_hf(megatron_dir, os.path.dirname(megatron_dir), overwrite=True))
    # A shard whose header reads but whose data holds NaN (bytes changed in place).
    corrupted = os.path.join(root, "corrupted-hf")
    shutil.copytree(hf_dir, corrupted)
    with open(os.path.join(corrupted, "model.safetensors.index.json")) as handle:
        name, filename = max(json.load(handle)["weight_map"].items())  # a layer tensor of the last layer
    shard = os.path.join(corrupted, filename)
    tensors = load_file(shard)
    tensors[name].view(-1)[5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out["nan shard"] = (_error(lambda: hf_to_megatron(corrupted, os.path.join(root, "from-corrupted"), progress=False)),
                        shard, name)
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets")
    hf_dir = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2), str(root / "source" / "hf"),
                           max_shard_size="60KB")
    other = make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=2), str(root / "other-hf"), seed=1)
    megatron_dir = str(root / "source" / "megatron")
    work = root / "work"
    work.mkdir()
    result = run_distributed(conversions, 1, hf_dir, other, megatron_dir, str(work))[0]
    return result, dict(hf=hf_dir, other=other, megatron=megatron_dir, work=str(work))


def test_megatron_to_hf_refuses_a_used_folder_and_leaves_it_alone(outcomes):
    out, _ = outcomes
    assert "is not empty (config.json, generation_config.json, model.safetensors, notes.txt); choose a new or empty " \
        "folder, or pass --overwrite" in out["hf refused"]
    assert "model.safetensors" in out["hf kept after refusal"]


def test_megatron_to_hf_overwrite_leaves_only_the_new_model(outcomes):
    from transformers import AutoModelForCausalLM

    out, dirs = outcomes
    written = out["hf overwritten"]
    assert "model.safetensors" not in written and "notes.txt" not in written
    assert "model.safetensors.index.json" in written and sum(f.endswith(".safetensors") for f in written) > 1
    assert not [name for name in out["hf siblings"] if "partial" in name]  # nothing left beside it
    tokens = torch.randint(0, 301, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dirs["hf"], dtype=torch.float32)(tokens).logits
        actual = AutoModelForCausalLM.from_pretrained(os.path.join(dirs["work"], "used-hf"), dtype=torch.float32)(tokens).logits
    assert torch.equal(actual, expected)


def test_a_training_runs_folder_is_never_a_conversion_target(outcomes):
    out, _ = outcomes
    for key in ("hf into run", "megatron into run"):
        assert "holds megatron checkpoints (iter_0000004, iter_0000008" in out[key], key
        assert "not even with --overwrite" in out[key]
    assert out["run after"] == ["iter_0000004", "iter_0000008", "latest_checkpointed_iteration.txt"]
    assert out["run tracker after"] == "8"
    assert "latest_checkpointed_iteration.txt (says '12')" in out["megatron into moved-on run"]


def test_hf_to_megatron_replaces_an_earlier_conversion_only_with_overwrite(outcomes):
    out, dirs = outcomes
    assert "is not empty (hf_assets, latest_checkpointed_iteration.txt, release" in out["megatron refused"]
    assert "tokenizer.model" not in out["megatron overwritten assets"]
    assert out["megatron overwritten from"] == os.path.abspath(dirs["hf"])


def test_overwrite_never_deletes_the_source(outcomes):
    out, dirs = outcomes
    assert out["overwrite source"] == (f"--overwrite would delete --load-dir {dirs['megatron']}: it lies inside "
                                       f"--save-dir {os.path.dirname(dirs['megatron'])}")
    assert os.path.exists(os.path.join(dirs["megatron"], "release"))


def test_a_shard_with_nan_data_is_named(outcomes):
    out, dirs = outcomes
    message, shard, name = out["nan shard"]
    assert shard.startswith(os.path.join(dirs["work"], "corrupted-hf", "model-0"))
    assert message == f"{shard}: tensor {name!r} holds NaN or Inf values; the file is corrupted"


def test_the_cli_refuses_before_starting_any_process_group(outcomes, capsys, tmp_path):
    from tools.convert_checkpoint import main

    _, dirs = outcomes
    used = tmp_path / "used"
    used.mkdir()
    (used / "model.safetensors").write_bytes(b"old")
    assert main(["megatron-to-hf", "--load-dir", dirs["megatron"], "--save-dir", str(used)]) == 2
    assert f"--save-dir {used} is not empty (model.safetensors)" in capsys.readouterr().err
    run = training_run(str(tmp_path / "run"))
    assert main(["hf-to-megatron", "--load-dir", dirs["hf"], "--save-dir", run, "--overwrite"]) == 2
    assert "holds megatron checkpoints (iter_0000004, iter_0000008" in capsys.readouterr().err


def test_a_folder_with_only_an_unfinished_save_says_so(tmp_path, capsys):
    from tools.convert_checkpoint import main as convert
    from tools.verify_checkpoint import main as verify

    save = tmp_path / "save"
    (save / "iter_0000010.partial").mkdir(parents=True)
    expected = f"{save} holds only an unfinished save (iter_0000010.partial)"
    assert convert(["megatron-to-hf", "--load-dir", str(save), "--save-dir", str(tmp_path / "hf")]) == 2
    assert expected in capsys.readouterr().err
    assert verify(["--hf-dir", str(tmp_path), "--megatron-dir", str(save)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_a_corrupted_index_is_named(tmp_path):
    from symnoise_megatron.checkpoint.safetensors_io import HFCheckpointReader

    hf_dir = make_hf_model("llama", dict(num_attention_heads=4), str(tmp_path / "hf"), max_shard_size="60KB")
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as handle:
        handle.write("{")
    with pytest.raises(ValueError, match=r"hf/model.safetensors.index.json is not a safetensors index"):
        HFCheckpointReader(hf_dir)
