"""Reading one .safetensors file lazily: the header at open, one tensor's bytes on request.

The header is parsed and checked against the file size up front, so a truncated or corrupt file is
refused before any merge work starts (with the file named), and every name, shape and dtype is
known without reading tensor data. Data is read with positioned reads (``os.preadv``) straight into
a fresh tensor: unlike a memory map, the pages do not stay resident in this process, so peak memory
is bounded by the tensors in flight rather than by the size of the checkpoints.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moerge.errors import MoergeError

# safetensors dtype codes <-> torch dtypes (the format's own names)
DTYPES: dict[str, torch.dtype] = {
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
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from the header alone."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _bad(path: Path, why: str) -> MoergeError:
    return MoergeError(
        f"{path}: not a valid safetensors file ({why}); re-download or re-save it"
    )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header; return tensor infos and the file's ``__metadata__``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, "file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise _bad(path, f"header length {n} does not fit in a {size}-byte file")
            raw = f.read(n)
    except OSError as e:
        raise MoergeError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "header is not JSON") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"tensor {name!r} has a malformed or unsupported entry") from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != numel * itemsize or begin < 0 or end > data_len:
            raise _bad(
                path,
                f"tensor {name!r} needs bytes {begin}..{end} but the data section has {data_len}"
                " (truncated?)",
            )
        infos[name] = TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)
    return infos, meta


def read_tensor(info: TensorInfo, fd: int | None = None) -> torch.Tensor:
    """Read one tensor's bytes into a new, writable tensor (no memory map kept)."""
    out = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        own = fd is None
        if own:
            fd = os.open(info.path, os.O_RDONLY)
        try:
            view = memoryview(out.numpy())
            got = 0
            while got < info.nbytes:
                k = os.preadv(fd, [view[got:]], info.begin + got)
                if k <= 0:
                    raise _bad(info.path, f"tensor {info.name!r} is cut short")
                got += k
        finally:
            if own:
                os.close(fd)
    return out.view(info.dtype).reshape(info.shape)
