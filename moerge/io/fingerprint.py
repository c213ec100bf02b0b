"""Cheap, content-sensitive fingerprints of checkpoints, for lineage in model cards.

Hashing every byte of every input would cost as much as the merge itself. A fingerprint instead
hashes each tensor's name, dtype and shape plus a few spaced samples of its bytes: a re-save of the
same weights gives the same fingerprint, while a fine-tune (which changes virtually every tensor) or
a different model gives another. A base with a LoRA applied combines the base's fingerprint with a
full hash of the (small) adapter.
"""

from __future__ import annotations

import hashlib
import os

from moerge.io.source import TensorSource, open_source

SAMPLES = 4
SAMPLE_BYTES = 256


def _sample_file_tensor(fds: dict, info) -> bytes:
    fd = fds.get(info.path)
    if fd is None:
        fd = fds[info.path] = os.open(info.path, os.O_RDONLY)
    size = min(SAMPLE_BYTES, info.nbytes)
    step = max(1, (info.nbytes - size) // max(1, SAMPLES - 1))
    return b"".join(os.pread(fd, size, min(info.begin + k * step, info.end - size)) for k in range(SAMPLES))


def fingerprint(source: TensorSource) -> str:
    h = hashlib.sha256()
    base = getattr(source, "base", None)
    if base is not None:  # a base with an expert applied
        h.update(fingerprint(base).encode() + source.expert.digest().encode())
        return "sha256:" + h.hexdigest()[:32]
    fds: dict = {}
    try:
        for name in sorted(source.names()):
            info = source.info(name)
            h.update(f"{name}|{info.dtype}|{list(info.shape)}\n".encode())
            if not info.nbytes:
                continue
            if info.path.suffix == ".safetensors":
                h.update(_sample_file_tensor(fds, info))
            else:
                t = source.get(name).reshape(-1).view(-1)
                n = t.numel()
                picks = sorted({int(i * (n - 1) / 31) for i in range(32)})
                h.update(t[picks].float().numpy().tobytes())
    finally:
        for fd in fds.values():
            os.close(fd)
    return "sha256:" + h.hexdigest()[:32]


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """The fingerprint of the weights in a model folder (safetensors or .bin)."""
    source = open_source(folder)
    try:
        return fingerprint(source)
    finally:
        close = getattr(source, "close", None)
        if close:
            close()
