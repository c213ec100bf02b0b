"""A content-addressed object store: one file per distinct content, named by its sha256.

Shared by the expert library (its ``blobs/``) and git version control (``.git/moerge/objects``), so
the two agree on layout and checks. Objects are written to a temporary file in ``tmp`` (the same
disk), flushed, and renamed into place: an object file is always complete. Every read is checked
against the expected size and the sha256 its name promises, so a damaged or truncated object is
reported instead of used. No torch here: git's filters import this module and must start fast.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path


class BlobError(Exception):
    """An object that is missing or does not match its name; ``state`` is "missing" or "corrupt"."""

    def __init__(self, digest: str, state: str, detail: str = ""):
        super().__init__(f"object {digest[:12]} is {state}" + (f" ({detail})" if detail else ""))
        self.digest, self.state, self.detail = digest, state, detail


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    def __init__(self, root: str | os.PathLike, tmp: str | os.PathLike | None = None):
        self.root = Path(root)
        self.tmp = Path(tmp) if tmp is not None else self.root / "tmp"

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:]

    def has(self, digest: str, nbytes: int | None = None) -> bool:
        try:
            size = self.path(digest).stat().st_size
        except FileNotFoundError:
            return False
        return nbytes is None or size == nbytes

    def put(self, data: bytes, *, repair: bool = True, digest: str | None = None) -> tuple[str, bool]:
        """Store ``data`` once; returns (its sha256, whether a damaged copy already there was rewritten).
        With ``repair`` an existing object is compared byte for byte (cheap next to hashing), so storing
        the same content again repairs a corrupt object; without it an object of the right size is
        trusted (reads check the hash anyway)."""
        digest = digest or sha256(data)
        path = self.path(digest)
        existed = path.exists()
        if existed and path.stat().st_size == len(data) and (not repair or path.read_bytes() == data):
            os.utime(path)  # a fresh mtime keeps a concurrent garbage collection from taking it
            return digest, False
        self.write(path, data)
        return digest, existed

    def write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` in the store atomically: a temporary file in ``tmp``, flushed, renamed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{path.name}.{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, digest: str, nbytes: int | None = None) -> bytes:
        """The object's bytes, checked against ``nbytes`` and its sha256 (BlobError otherwise)."""
        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise BlobError(digest, "missing") from None
        if nbytes is not None and len(data) != nbytes:
            raise BlobError(digest, "corrupt", f"{len(data)} bytes instead of {nbytes}")
        if sha256(data) != digest:
            raise BlobError(digest, "corrupt", "sha256 mismatch")
        return data

    def check(self, digest: str, nbytes: int | None = None) -> str | None:
        """None if the object is sound, else "missing" or "corrupt"."""
        try:
            self.read(digest, nbytes)
        except BlobError as e:
            return e.state
        return None

    def quarantine(self, digest: str) -> None:
        """Move a damaged object aside (into ``tmp``), so that it counts as missing and is fetched again."""
        self.move_aside(self.path(digest))

    def move_aside(self, path: Path) -> None:
        self.tmp.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, self.tmp / f"damaged-{path.parent.name}{path.name}.{uuid.uuid4().hex}")
        except FileNotFoundError:
            pass

    def digests(self) -> set[str]:
        return {p.parent.name + p.name for p in self.root.glob("??/*") if "." not in p.name}

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size
