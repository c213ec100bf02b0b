"""Writing a checkpoint tensor by tensor, in any order, into a folder that appears only when complete.

Because a merge plan knows every output tensor's name, shape and dtype before any math runs, the
shard layout and each safetensors header are written first; workers then put each tensor's bytes at
its offset with ``os.pwrite`` as soon as it is computed. Nothing waits for a shard to fill in memory,
and peak memory stays at the tensors in flight. Everything is written under a hidden temporary name
beside the destination and renamed into place at the end, so a failed or interrupted run never leaves
something that looks like a finished model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import torch

from moerge.errors import MoergeError
from moerge.io.safetensors_file import CODES

# "B" alone is mergekit's billion (5B = 5e9 bytes); KB/MB/GB/TB are powers of 1000 and KiB/MiB/GiB/TiB
# powers of 1024, as in transformers' max_shard_size (convert_file_size_to_int); K/M/G/T are 1000s.
UNITS = {
    "": 1, "B": 10**9,
    "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
SIZE_FORMS = ("a byte count (500000000) or a number with a unit: 5B (mergekit: 5 billion bytes), 500M, 2G; "
              "500MB, 5GB, 10KB (powers of 1000); 500MiB, 5GiB, 10KiB (powers of 1024); units in any case")


def parse_size(text: str | int) -> int:
    """A shard size in bytes: a plain count, mergekit's '5B' (5 billion bytes), '500M', '2G', or
    transformers' max_shard_size spellings '500MB', '5GB', '10KB' (powers of 1000) and '500MiB',
    '5GiB', '10KiB' (powers of 1024). Units are case-insensitive and always mean bytes (transformers
    reads a lowercase final b as bits; a shard size in bits is never what is meant)."""
    if isinstance(text, bool):
        raise MoergeError(f"shard size {text!r}: give {SIZE_FORMS}")
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*", str(text))
        unit = m[2].upper() if m else None
        if unit not in UNITS:
            raise MoergeError(f"shard size {text!r}: give {SIZE_FORMS}")
        size = int(Fraction(m[1]) * UNITS[unit])  # exact: no float rounding, no overflow
    if size < 1:
        raise MoergeError(f"shard size {text!r}: must be at least 1 byte; give {SIZE_FORMS}")
    return size


@dataclass(frozen=True)
class Slot:
    file: Path
    offset: int
    nbytes: int


def dtype_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


class ShardedWriter:
    """Pre-laid-out safetensors shards written in place; ``commit`` renames the folder into place."""

    def __init__(
        self,
        out_dir: Path,
        tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = 5_000_000_000,
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        if self.out_dir.exists() and not overwrite:
            raise MoergeError(f"{self.out_dir}: already exists; choose another folder or pass --overwrite")
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self.slots: dict[str, Slot] = {}
        self._pending: set[str] = {name for name, _, _ in tensors}
        self._lock = threading.Lock()
        self._fds: dict[Path, int] = {}

        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in tensors:
            n = dtype_nbytes(shape, dtype)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype, n))
            size += n
        count = len(shards)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path = self.tmp / fname
            header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
            pos = 0
            for name, shape, dtype, n in shard:
                header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
                pos += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
            start = 8 + len(raw)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(start + pos)
            for name, shape, dtype, n in shard:
                self.slots[name] = Slot(path, start + header[name]["data_offsets"][0], n)
                self.weight_map[name] = fname
            self.total_bytes += pos
        self.files = [self.tmp / f for f in dict.fromkeys(self.weight_map.values())]

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_WRONLY)
            return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots[name]
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        if data.numel() != slot.nbytes:
            raise RuntimeError(f"{name}: computed {data.numel()} bytes, planned {slot.nbytes}")
        view = memoryview(data.numpy())
        fd = self._fd(slot.file)
        done = 0
        while done < slot.nbytes:
            done += os.pwrite(fd, view[done:], slot.offset + done)
        with self._lock:
            self._pending.discard(name)

    def add_file(self, name: str, content: str | bytes) -> None:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def copy_file(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.tmp / (name or src.name))

    def _close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def commit(self) -> Path:
        """Finish the index, flush, and move the folder into place."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} planned tensors were never written, e.g. {sorted(self._pending)[0]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        for fd in self._fds.values():
            os.fsync(fd)
        self._close()
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            self.out_dir.rename(old)
        self.tmp.rename(self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out_dir

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)
