"""Lazy Hugging Face safetensors I/O: tensors are read one at a time, written shard by shard."""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFCheckpointReader:
    """The tensors of an HF checkpoint directory, opened lazily (one tensor in memory at a time)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX)
        if os.path.exists(index_path):
            with open(index_path, encoding="utf-8") as handle:
                try:
                    self.files: Dict[str, str] = json.load(handle)["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{index_path} is not a safetensors index (JSON with a weight_map): {error!r}") from None
        elif os.path.exists(os.path.join(directory, SINGLE)):
            self.files = {name: SINGLE for name in self._names_in(SINGLE)}
        else:
            raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
        for filename in sorted(set(self.files.values())):
            listed = {name for name, f in self.files.items() if f == filename}
            present = self._names_in(filename)
            if listed - present:
                raise ValueError(f"{os.path.join(directory, filename)} lacks tensors its index lists: {sorted(listed - present)[:5]}")

    def _names_in(self, filename: str) -> set:
        path = os.path.join(self.directory, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is listed in the checkpoint but does not exist")
        try:
            with safe_open(path, framework="pt") as handle:
                return set(handle.keys())
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupted): {error}") from None

    def names(self) -> List[str]:
        return sorted(self.files)

    def shape(self, name: str) -> List[int]:
        """The shape from the file header, without reading the data."""
        path = os.path.join(self.directory, self.files[name])
        with safe_open(path, framework="pt") as handle:
            return handle.get_slice(name).get_shape()

    def path_of(self, name: str) -> str:
        return os.path.join(self.directory, self.files[name])

    def get(self, name: str, finite: bool = False) -> torch.Tensor:
        """The tensor ``name``; with ``finite``, a NaN or Inf in it is an error naming its file.

        A pretrained checkpoint holds no NaN or Inf, so one is the sign of a corrupted shard
        whose header still reads (safetensors files carry no checksum).
        """
        if name not in self.files:
            raise KeyError(f"{self.directory}: missing tensor {name!r}")
        path = self.path_of(name)
        try:
            with safe_open(path, framework="pt") as handle:
                tensor = handle.get_tensor(name)
        except SafetensorError as error:
            raise ValueError(f"{path}: cannot read {name!r} (truncated or corrupted file): {error}") from None
        # A float32 sum: NaN and Inf propagate, with no copy of the tensor.
        if finite and tensor.is_floating_point() and not torch.isfinite(tensor.sum(dtype=torch.float32)):
            raise ValueError(f"{path}: tensor {name!r} holds NaN or Inf values; the file is corrupted")
        return tensor


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes``."""

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 2**30):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: List[List[str]] = []
        self.total_bytes = 0
        os.makedirs(directory, exist_ok=True)

    def add(self, tensors: Dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self._flush()
            self.pending[name] = tensor.contiguous()
            self.pending_bytes += size
            self.total_bytes += size

    def _flush(self) -> None:
        index = len(self.shards)
        save_file(self.pending, os.path.join(self.directory, f".shard-{index}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.shards)
        weight_map = {}
        for index, names in enumerate(self.shards):
            filename = SINGLE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.directory, f".shard-{index}.tmp"), os.path.join(self.directory, filename))
            weight_map.update({name: filename for name in names})
        if count > 1:
            with open(os.path.join(self.directory, INDEX), "w", encoding="utf-8") as handle:
                json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, handle, indent=2)


def copy_files(source: str, target: str, names: Iterable[str]) -> List[str]:
    """Copy the listed files that exist in ``source``; returns those copied."""
    import shutil

    copied = []
    for name in names:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(target, name))
            copied.append(name)
    return copied
