"""Streaming reader and writer of the safetensors format (https://github.com/huggingface/safetensors).

Layout: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [b, e]}, ...,
"__metadata__": {...}}`, then the raw little-endian tensor bytes. The reader memory-maps the file and returns
zero-copy numpy views (bf16 through `ml_dtypes`, which `safetensors.numpy` cannot do), so a loader can copy one
device shard of one tensor at a time. The writer streams tensors produced one by one by a callback.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is unreadable or malformed; the message names the file."""


class SafetensorsFile:
    """Read-only, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._base = 8 + n
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        """The tensor names in the file."""
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`."""
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def array(self, name: str) -> np.ndarray:
        """Zero-copy view of tensor `name` (reads from disk only when indexed/copied)."""
        info = self._header[name]
        begin, end = info["data_offsets"]
        dtype = self.dtype(name)
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise SafetensorsError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, its shape {shape} "
                                   f"and dtype need {expected}")
        raw = self._mmap[self._base + begin:self._base + end]
        return raw.view(dtype).reshape(shape)


def write_file(path: str | os.PathLike, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
               produce: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors named in `specs` ({name: (shape, dtype)}) in order, asking `produce(name)` for each one
    only when it is written (peak host memory: one tensor)."""
    header: dict = {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset,
                                                                                                 offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in specs.items():
            arr = np.ascontiguousarray(produce(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise SafetensorsError(f"{path}: tensor {name!r} produced shape {arr.shape}, declared {shape}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


def plan_shards(specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], max_shard_bytes: int,
                ) -> list[list[str]]:
    """Groups tensor names into consecutive files of at most `max_shard_bytes` (a larger tensor gets its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, (shape, dtype) in specs.items():
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def iter_names(files: Iterable[SafetensorsFile]) -> Iterable[tuple[str, SafetensorsFile]]:
    """(tensor name, file) for every tensor of the files, in file order."""
    for f in files:
        for name in f.keys():
            yield name, f
