"""Tensors of safetensors files, one at a time: listed from the headers, read by name with plain file reads,
and written into a file whose header is laid out first, so no file is ever held whole in memory."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import UserError
from .weights import check_safetensors_file, check_safetensors_folder


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code: F32, BF16, I64, ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # begin of the data, relative to the data section
    data_start: int  # where the file's data section begins
    nbytes: int


def list_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder's ``*.safetensors`` files (from the headers alone)."""
    # Safetensors only, each whole (trainer.model_files.weights). Not the index: the merge reads the files themselves
    # and mirrors the tuned folder's index as it is.
    files = check_safetensors_folder(folder, index=False)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        header, start = check_safetensors_file(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if name in tensors:
                raise UserError(f"tensor {name!r} is stored twice in {folder} ({tensors[name].file.name}, {f.name})")
            begin, end = meta["data_offsets"]
            tensors[name] = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), f, begin, start, end - begin)
    return tensors


class TensorReader:
    """Reads tensors by name with plain file reads into fresh tensors. Not through a memory map: every page
    of a mapped checkpoint that has been read stays in this process's resident set while the file is open,
    so reading two whole models that way would show as their full size."""

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors

    def get(self, name: str):
        import torch

        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        if buf.nbytes != info.nbytes:
            raise UserError(f"{info.file}: tensor {name!r} holds {info.nbytes} bytes, expected {buf.nbytes}")
        with open(info.file, "rb") as f:
            f.seek(info.data_start + info.offset)
            if f.readinto(buf) != info.nbytes:
                raise UserError(f"{info.file} is truncated: tensor {name!r} is incomplete")
        return out


class ShardWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes, offsets) is fixed
    first, then each tensor's bytes are appended in header order."""

    def __init__(self, path: Path, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch_dtype(dtype).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, name: str, tensor) -> None:
        want, nbytes = self.expected[self.next]
        import torch

        data = tensor.contiguous().view(-1).view(torch.uint8).numpy()
        if name != want or data.nbytes != nbytes:
            raise RuntimeError(f"shard writer: got {name} ({data.nbytes} bytes), expected {want} ({nbytes} bytes)")
        self.file.write(memoryview(data))
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.expected):
            raise RuntimeError(f"shard writer: {len(self.expected) - self.next} tensors were never written")


def torch_dtype(code: str):
    """The torch dtype of a safetensors dtype code (``F32``, ``BF16``, ``I64``, ...)."""
    import torch

    codes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    if code not in codes:
        raise UserError(f"tensor dtype {code} is not supported by dler merge")
    return codes[code]
