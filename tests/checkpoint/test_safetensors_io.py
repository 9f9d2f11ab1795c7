"""The planned safetensors writer: the files safetensors itself writes, from tensors written one at a time."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from symnoise_megatron.checkpoint.safetensors_io import DTYPE_CODES, INDEX, PlannedTensor, ShardedSafetensorsLayout


def tensors():
    generator = torch.Generator().manual_seed(0)
    out = {}
    for index, dtype in enumerate(DTYPE_CODES):
        shape = [(3, 5), (7,), (0, 4), (2, 2, 3)][index % 4]
        values = torch.randn(shape, generator=generator) * 4
        out[f"t{(index * 7) % 16}.{str(dtype).replace('torch.', '')}"] = values.to(dtype)
    return out


def planned(named):
    return [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in named.items()]


def test_one_file_is_byte_for_byte_what_safetensors_writes(tmp_path):
    named = tensors()
    save_file(named, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    layout = ShardedSafetensorsLayout(planned(named), max_shard_bytes=1 << 30)
    layout.create(str(tmp_path / "ours"))
    with layout.writer(str(tmp_path / "ours")) as writer:
        for name in reversed(list(named)):  # any order
            writer.write(name, named[name])
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_shards_fill_in_order_and_the_index_names_every_tensor(tmp_path):
    named = {f"layer.{i}": torch.full((4, 4), float(i)) for i in range(5)}  # 64 bytes each
    named["huge"] = torch.ones(20, 4)  # 320 bytes: a file of its own
    layout = ShardedSafetensorsLayout(planned(named), max_shard_bytes=150)
    directory = str(tmp_path)
    layout.create(directory)
    with layout.writer(directory) as writer:
        for name, tensor in named.items():
            writer.write(name, tensor)
    layout.write_index(directory)
    index = json.loads((tmp_path / INDEX).read_text())
    assert layout.filenames == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert [sorted(n for n, f in index["weight_map"].items() if f == file) for file in layout.filenames] == [
        ["layer.0", "layer.1"], ["layer.2", "layer.3"], ["layer.4"], ["huge"]]
    assert index["metadata"]["total_size"] == 5 * 64 + 320
    for file in layout.filenames:
        for name, tensor in load_file(os.path.join(directory, file)).items():
            assert torch.equal(tensor, named[name])


def test_a_tensor_that_is_not_the_planned_one_is_refused(tmp_path):
    layout = ShardedSafetensorsLayout([PlannedTensor("w", (4, 3), torch.float32)])
    layout.create(str(tmp_path))
    with layout.writer(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match=r"w: got bfloat16 \(4, 3\), the checkpoint's tensor is float32 \(4, 3\)"):
            writer.write("w", torch.zeros(4, 3, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match=r"got float32 \(3, 3\)"):
            writer.write("w", torch.zeros(3, 3))
        with pytest.raises(KeyError):
            writer.write("v", torch.zeros(4, 3))
