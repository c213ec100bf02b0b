"""What git stores for a checkpoint: a small text manifest, one line per part of the file.

A safetensors file is an 8-byte header length, a JSON header, then each tensor's bytes. The manifest
keeps the file's exact layout as a list of parts in file order, each stored as an object named by the
sha256 of its bytes (``moerge.io.blobs``):

    moerge-checkpoint 1
    size 2345678
    header 5f2c...e1 412
    tensor 9ab0...77 65536 F32 128x128 model.layers.0.self_attn.q_proj.weight
    tensor 3c1d...02 512 BF16 256 model.norm.weight
    pad 0e57...aa 3

``header`` is the length prefix and JSON header as written (so metadata, key order and padding come
back bit for bit); ``pad`` holds bytes between tensors, if a writer left any. A file that is not
safetensors is kept whole as ``raw`` parts of at most 64 MB. The manifest is what ``git diff`` and
``git merge`` see: a tensor that did not change keeps its line, so it costs git nothing.

Reading a checkpoint never holds more than one tensor (or one 64 MB raw part) in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

MAGIC = "moerge-checkpoint 1"
RAW_PART = 64 << 20
MAX_HEADER = 100 << 20  # safetensors' own limit


class ManifestError(Exception):
    pass


@dataclass
class Part:
    kind: str  # header | tensor | pad | raw
    digest: str
    nbytes: int
    dtype: str = ""
    shape: tuple[int, ...] = ()
    name: str = ""

    def line(self) -> str:
        if self.kind == "tensor":
            shape = "x".join(map(str, self.shape)) if self.shape else "scalar"
            return f"tensor {self.digest} {self.nbytes} {self.dtype} {shape} {self.name}"
        return f"{self.kind} {self.digest} {self.nbytes}"

    @property
    def label(self) -> str:
        return f"tensor {self.name}" if self.kind == "tensor" else f"the {self.kind} bytes"


@dataclass
class Manifest:
    size: int
    parts: list[Part] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join([MAGIC, f"size {self.size}"] + [p.line() for p in self.parts]) + "\n"

    def tensors(self) -> dict[str, Part]:
        return {p.name: p for p in self.parts if p.kind == "tensor"}

    @property
    def is_safetensors(self) -> bool:
        return bool(self.parts) and self.parts[0].kind == "header"


def is_manifest(head: bytes) -> bool:
    return head.startswith(MAGIC.encode())


def parse(text: str | bytes, where: str = "manifest") -> Manifest:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    lines = text.split("\n")  # only "\n" ends a line: a tensor name may hold other line-breaking characters
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != MAGIC:
        raise ManifestError(f"{where}: not a moerge checkpoint manifest")
    try:
        key, size = lines[1].split(" ", 1)
        if key != "size":
            raise ValueError
        m = Manifest(int(size))
        for i, line in enumerate(lines[2:], 3):
            kind, rest = line.split(" ", 1)
            if kind == "tensor":
                digest, n, dtype, shape, name = rest.split(" ", 4)
                dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
                m.parts.append(Part(kind, digest, int(n), dtype, dims, name))
            elif kind in ("header", "pad", "raw"):
                digest, n = rest.split(" ")
                m.parts.append(Part(kind, digest, int(n)))
            else:
                raise ValueError
    except (ValueError, IndexError):
        raise ManifestError(f"{where}: line {i if 'i' in locals() else 2} is not a manifest line; the manifest is "
                            "damaged (restore it from git)") from None
    if sum(p.nbytes for p in m.parts) != m.size:
        raise ManifestError(f"{where}: its parts add up to {sum(p.nbytes for p in m.parts)} bytes, not {m.size}; "
                            "the manifest is damaged (restore it from git)")
    return m


def _read_exactly(f: BinaryIO, n: int) -> bytes:
    chunks, left = [], n
    while left:
        b = f.read(left)
        if not b:
            break
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def safetensors_header(prefix: bytes) -> tuple[int, dict] | None:
    """(header length, header) if ``prefix`` (the file's first 8 + n bytes) is a safetensors header."""
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > MAX_HEADER or len(prefix) < 8 + n:
        return None
    try:
        header = json.loads(prefix[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if not (isinstance(v, dict) and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
                and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)):
            return None
    return n, header


def split(f: BinaryIO, store: Callable[[bytes], str]) -> Manifest:
    """Read a file from ``f`` part by part, ``store`` each part's bytes (returns its digest) and
    return the manifest. A file that is not a well-formed safetensors file is stored as raw parts."""
    first = _read_exactly(f, 8)
    parsed = None
    if len(first) == 8:
        (n,) = struct.unpack("<Q", first)
        if 2 <= n <= MAX_HEADER:
            rest = _read_exactly(f, n)
            first += rest
            parsed = safetensors_header(first)
    if parsed is None:
        return _raw(first, f, store)
    n, header = parsed
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    pos = 0
    for _, v in entries:  # overlapping or reversed ranges: not a file we can split by tensor
        start, end = v["data_offsets"]
        if not (isinstance(start, int) and isinstance(end, int)) or start < pos or end < start:
            return _raw(first, f, store)
        pos = end
    m = Manifest(0)
    m.parts.append(Part("header", store(first), len(first)))
    pos = 0
    for name, v in entries:
        start, end = v["data_offsets"]
        if start > pos:
            gap = _read_exactly(f, start - pos)
            if len(gap) < start - pos:
                raise ManifestError("the file ends inside the data of its tensors (truncated)")
            m.parts.append(Part("pad", store(gap), len(gap)))
        if "\n" in name:
            raise ManifestError(f"tensor {name!r}: its name holds a newline, which a manifest line cannot; rename it")
        data = _read_exactly(f, end - start)
        if len(data) < end - start:
            raise ManifestError(f"the file ends inside tensor {name} (truncated)")
        m.parts.append(Part("tensor", store(data), len(data), v["dtype"], tuple(v["shape"]), name))
        pos = end
    while True:  # trailing bytes, if any, are kept too
        tail = f.read(RAW_PART)
        if not tail:
            break
        m.parts.append(Part("pad", store(tail), len(tail)))
    m.size = sum(p.nbytes for p in m.parts)
    return m


def _raw(first: bytes, f: BinaryIO, store) -> Manifest:
    """Any other file, whole: parts of at most RAW_PART bytes."""
    m = Manifest(0)
    buf = first
    while True:
        while len(buf) >= RAW_PART:
            m.parts.append(Part("raw", store(buf[:RAW_PART]), RAW_PART))
            buf = buf[RAW_PART:]
        more = _read_exactly(f, RAW_PART - len(buf))
        buf += more
        if len(buf) < RAW_PART:  # the end of the file
            if buf:
                m.parts.append(Part("raw", store(buf), len(buf)))
            break
    m.size = sum(p.nbytes for p in m.parts)
    return m


def header(m: Manifest, read: Callable[[Part], bytes]) -> dict | None:
    """The JSON header of a safetensors manifest (None for raw content); ``read`` fetches the part."""
    if not m.is_safetensors:
        return None
    raw = read(m.parts[0])
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def join(m: Manifest, read: Callable[[Part], bytes]) -> Iterator[bytes]:
    """The file's bytes, part by part (``read`` fetches and checks each part)."""
    for p in m.parts:
        yield read(p)
