"""The repository's object store: the library's content-addressed blobs, where an object may also be
kept as a low-rank delta on another object (``moerge.vcs.lowrank``), as git keeps deltas in packs.

``objects/ab/cdef...`` holds an object's bytes; ``objects/ab/cdef....lr`` stands for the same bytes as
parent + factors + residual. A read prefers the plain file; otherwise it rebuilds from the delta
(its parent read the same way, so deltas may chain) and checks the result's size and sha256, so a
rebuilt object is exactly as trustworthy as a stored one.
"""

from __future__ import annotations

import os
from pathlib import Path

from moerge.io.blobs import BlobError, BlobStore, sha256
from moerge.vcs import lowrank

SUFFIX = ".lr"
MAX_CHAIN = 1000  # deltas on deltas: a cycle (a tampered store) must not recurse forever


class ObjectStore(BlobStore):
    def lr_path(self, digest: str) -> Path:
        return self.root / digest[:2] / (digest[2:] + SUFFIX)

    def is_delta(self, digest: str) -> bool:
        """Whether the object exists only as a low-rank delta here."""
        return not self.path(digest).exists() and self.lr_path(digest).exists()

    def has(self, digest: str, nbytes: int | None = None) -> bool:
        return super().has(digest, nbytes) or self.lr_path(digest).exists()

    def put(self, data: bytes, *, repair: bool = True, digest: str | None = None) -> tuple[str, bool]:
        digest = digest or sha256(data)
        if not repair and self.is_delta(digest):  # `git add` of a tensor already kept as factors: nothing to write
            os.utime(self.lr_path(digest))
            return digest, False
        return super().put(data, repair=repair, digest=digest)

    def put_delta(self, digest: str, obj: bytes) -> None:
        """Keep ``digest`` as the low-rank object ``obj`` (written atomically); a plain copy is removed."""
        self.write(self.lr_path(digest), obj)
        self.path(digest).unlink(missing_ok=True)

    def read(self, digest: str, nbytes: int | None = None, _depth: int = 0) -> bytes:
        if self.path(digest).exists() or not self.lr_path(digest).exists():
            return super().read(digest, nbytes)

        if _depth > MAX_CHAIN:
            raise BlobError(digest, "corrupt", "its low-rank deltas form a cycle")
        obj = self.lr_path(digest).read_bytes()
        try:
            head = lowrank.header(obj)
        except lowrank.LowRankError as e:
            raise BlobError(digest, "corrupt", str(e)) from None
        try:
            parent = self.read(head["parent"], head["parent_nbytes"], _depth + 1)
        except BlobError as e:  # the delta itself is sound: what must be fetched again is the parent
            if e.state == "corrupt" and e.digest == head["parent"]:
                self.quarantine(e.digest)
            raise BlobError(digest, "missing", f"kept as factors on object {head['parent'][:12]}, which is {e.state}"
                            + (" (moved aside)" if e.state == "corrupt" else "")) from None
        try:
            data = lowrank.decode(obj, parent)
        except lowrank.LowRankError as e:
            raise BlobError(digest, "corrupt", str(e)) from None
        if nbytes is not None and len(data) != nbytes:
            raise BlobError(digest, "corrupt", f"rebuilds {len(data)} bytes instead of {nbytes}")
        if sha256(data) != digest:
            raise BlobError(digest, "corrupt", "its low-rank rebuild does not match its sha256")
        return data

    def delta_parent(self, digest: str) -> tuple[str, int] | None:
        """(digest, size) of the object a delta-kept object is built on (None for a plain or absent one,
        or a damaged delta)."""
        if not self.is_delta(digest):
            return None

        try:
            with open(self.lr_path(digest), "rb") as f:
                head = lowrank.header(f.read())
            return head["parent"], head["parent_nbytes"]
        except (OSError, lowrank.LowRankError):
            return None

    def quarantine(self, digest: str) -> None:
        """Move aside the copy a read uses: the plain file if there is one, else the delta."""
        self.move_aside(self.path(digest) if self.path(digest).exists() else self.lr_path(digest))

    def digests(self) -> set[str]:
        return super().digests() | self.delta_digests()

    def delta_digests(self) -> set[str]:
        return {p.parent.name + p.name[:-len(SUFFIX)] for p in self.root.glob(f"??/*{SUFFIX}")}

    def size(self, digest: str) -> int:
        """Bytes on disk (a delta's, when that is how it is kept)."""
        return (self.path(digest) if self.path(digest).exists() else self.lr_path(digest)).stat().st_size
