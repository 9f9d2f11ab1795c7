"""Lazy Hugging Face safetensors I/O: tensors are read one at a time, and written one at a time
into shards whose layout is planned before any is read."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Tuple

import torch
from safetensors import SafetensorError, safe_open

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


# safetensors' dtype codes, in the order its writer lays out a file's tensors: this order
# first (its Rust ``Dtype`` enum, descending), then by name.
DTYPE_CODES: Dict[torch.dtype, str] = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64", torch.float32: "F32",
    torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16",
    torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_LAYOUT_ORDER = {dtype: rank for rank, dtype in enumerate(DTYPE_CODES)}
# A single write() moves at most about 2 GiB on Linux: larger tensors go in pieces.
_WRITE_PIECE = 1 << 30


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(tensors: List[PlannedTensor], metadata: Dict[str, str]) -> Tuple[bytes, Dict[str, int]]:
    """The header safetensors writes for ``tensors`` (its 8-byte length included) and where each
    tensor's bytes start, counted from the file's start."""
    ordered = sorted(tensors, key=lambda t: (_LAYOUT_ORDER[t.dtype], t.name))
    entries, offset = {"__metadata__": metadata}, 0
    for tensor in ordered:
        entries[tensor.name] = {"dtype": DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape),
                                "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to a multiple of 8 bytes
    head = struct.pack("<Q", len(text)) + text
    starts, offset = {}, len(head)
    for tensor in ordered:
        starts[tensor.name] = offset
        offset += tensor.nbytes
    return head, starts


class ShardedSafetensorsLayout:
    """Where every tensor of a sharded safetensors checkpoint goes, decided from names, shapes
    and dtypes before any tensor is read.

    Tensors fill ``model-0000i-of-0000n.safetensors`` files in the order given, a new file when
    the next tensor would take the current one past ``max_shard_bytes`` (a larger tensor gets a
    file of its own); one file is ``model.safetensors``. Each file is byte for byte what
    safetensors' ``save_file`` writes for the same tensors. safetensors itself writes a file
    only from all of its tensors at once (its header precedes the data and names every
    tensor's place); here :meth:`create` writes the headers and :meth:`writer` puts each
    tensor's bytes at its place, in any order and from any process, so several ranks write one
    checkpoint together and none holds more than what it is writing.
    """

    def __init__(self, tensors: List[PlannedTensor], max_shard_bytes: int = 5 * 2**30):
        if sys.byteorder != "little":  # safetensors stores little-endian; tensors are written as they lie in memory
            raise RuntimeError("writing safetensors needs a little-endian machine")
        unknown = sorted({str(t.dtype) for t in tensors if t.dtype not in DTYPE_CODES})
        if unknown:
            raise ValueError(f"safetensors cannot store {', '.join(unknown)}")
        self.tensors = {t.name: t for t in tensors}
        if len(self.tensors) != len(tensors):
            raise ValueError("a tensor name is planned twice")
        groups: List[List[PlannedTensor]] = []
        size = 0
        for tensor in tensors:
            if not groups or (groups[-1] and size + tensor.nbytes > max_shard_bytes):
                groups.append([])
                size = 0
            groups[-1].append(tensor)
            size += tensor.nbytes
        count = len(groups)
        self.filenames = [SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.headers: List[bytes] = []
        self.file_sizes: List[int] = []
        self.places: Dict[str, Tuple[int, int]] = {}  # name -> (file index, first byte)
        for index, group in enumerate(groups):
            head, starts = _header(group, {"format": "pt"})
            self.headers.append(head)
            self.file_sizes.append(len(head) + sum(t.nbytes for t in group))
            self.places.update({name: (index, start) for name, start in starts.items()})
        self.total_bytes = sum(t.nbytes for t in tensors)

    def create(self, directory: str) -> None:
        """Every file with its header, at its full size (the data still zeros). One process."""
        os.makedirs(directory, exist_ok=True)
        for filename, head, size in zip(self.filenames, self.headers, self.file_sizes):
            with open(os.path.join(directory, filename), "wb") as handle:
                handle.write(head)
                handle.truncate(size)

    def writer(self, directory: str) -> "ShardWriter":
        return ShardWriter(self, directory)

    def write_index(self, directory: str) -> None:
        """``model.safetensors.index.json`` for more than one file (what transformers writes)."""
        if len(self.filenames) == 1:
            return
        weight_map = {name: self.filenames[index] for name, (index, _) in sorted(self.places.items())}
        with open(os.path.join(directory, INDEX), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, handle, indent=2)


class ShardWriter:
    """Writes tensors into the files a layout created, each at its place."""

    def __init__(self, layout: ShardedSafetensorsLayout, directory: str):
        self.layout = layout
        self.directory = directory
        self.handles: Dict[int, int] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        planned = self.layout.tensors.get(name)
        if planned is None:
            raise KeyError(f"{name} is not a tensor of this checkpoint")
        if tensor.dtype != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise ValueError(f"{name}: got {str(tensor.dtype).replace('torch.', '')} {tuple(tensor.shape)}, the "
                             f"checkpoint's tensor is {str(planned.dtype).replace('torch.', '')} {planned.shape}")
        index, offset = self.layout.places[name]
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        handle = self._handle(index)
        for piece in range(0, len(data), _WRITE_PIECE):
            chunk = data[piece:piece + _WRITE_PIECE]
            while len(chunk):
                written = os.pwrite(handle, chunk, offset)
                chunk, offset = chunk[written:], offset + written

    def _handle(self, index: int) -> int:
        if index not in self.handles:
            self.handles[index] = os.open(os.path.join(self.directory, self.layout.filenames[index]), os.O_WRONLY)
        return self.handles[index]

    def close(self) -> None:
        for handle in self.handles.values():
            os.close(handle)
        self.handles = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
