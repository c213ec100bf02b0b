"""git's clean and smudge filters for checkpoints.

clean (``git add``): the checkpoint on stdin becomes its manifest on stdout; each part's bytes go to
the object store first (an object already there is not written again), so git only ever records
what the manifest names. smudge (checkout): the manifest on stdin becomes the original bytes on
stdout, every object checked against its sha256 on the way; a missing or damaged object stops the
checkout with one line naming the file, the tensor and how to get it back.

Content that is already a manifest passes clean unchanged (re-adding a file whose objects are
missing), and content that is not a manifest passes smudge unchanged (files committed before the
checkpoint was tracked).

    python -m moerge.vcs.filter clean PATH  <file  >manifest
    python -m moerge.vcs.filter smudge PATH <manifest  >file
"""

from __future__ import annotations

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

from moerge.errors import MoergeError
from moerge.io.blobs import BlobError, BlobStore
from moerge.vcs import manifest as mf
from moerge.vcs.repo import objects


class FilterError(Exception):
    pass


def clean(src: BinaryIO, dst: BinaryIO, store: BlobStore, path: str = "<stdin>") -> mf.Manifest | None:
    head = src.peek(len(mf.MAGIC)) if hasattr(src, "peek") else b""
    if head and mf.is_manifest(head):  # already clean
        data = src.read()
        dst.write(data)
        return None
    # reading part i+1 overlaps hashing and storing part i (hashlib and file I/O release the GIL);
    # at most two parts are in memory
    pool = ThreadPoolExecutor(1, thread_name_prefix="moerge-clean")
    pending: Future | None = None

    def submit(data: bytes) -> Future:
        nonlocal pending
        if pending is not None:
            pending.result()  # the previous part is stored before the next one is queued
        pending = pool.submit(lambda: store.put(data, repair=False)[0])
        return pending

    try:
        m = mf.split(src, submit)
        for p in m.parts:
            p.digest = p.digest.result()
    except mf.ManifestError as e:
        raise FilterError(f"{path}: {e}") from None
    finally:
        pool.shutdown(wait=True)
    if path.endswith(".safetensors") and not m.is_safetensors:  # empty, or cut or damaged inside its header
        raise FilterError(f"{path}: is not a readable safetensors file ({m.size} bytes, no valid header); it was "
                          "probably truncated or damaged: write it again (or untrack non-checkpoint files)")
    dst.write(m.text().encode())
    return m


def smudge(src: BinaryIO, dst: BinaryIO, store: BlobStore, path: str = "<stdin>") -> mf.Manifest | None:
    data = src.read()
    if not mf.is_manifest(data[:len(mf.MAGIC)]):
        dst.write(data)  # not a manifest: a file committed before moerge tracked it
        return None
    try:
        m = mf.parse(data, path)
    except mf.ManifestError as e:
        raise FilterError(str(e)) from None
    # reading and hashing part i+1 overlaps writing part i
    with ThreadPoolExecutor(1, thread_name_prefix="moerge-smudge") as pool:
        ahead = pool.submit(store.read, m.parts[0].digest, m.parts[0].nbytes) if m.parts else None
        for i, p in enumerate(m.parts):
            try:
                data = ahead.result()
            except BlobError as e:
                if e.state == "corrupt":
                    store.quarantine(e.digest)  # now missing: `moerge git pull` fetches it again
                _missing(e, p, path)
            if i + 1 < len(m.parts):
                nxt = m.parts[i + 1]
                ahead = pool.submit(store.read, nxt.digest, nxt.nbytes)
            dst.write(data)
    return m


def _missing(e: BlobError, p: mf.Part, path: str):
    fix = ("fetch the objects with `moerge git pull REMOTE` (or copy .git/moerge/objects from a clone that has them), "
           "then `git checkout -- " + path + "`")
    if e.state == "corrupt":
        fix = "it was damaged or tampered with and is moved aside; " + fix
    raise FilterError(f"{path}: {p.label}: {e}; {fix}") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("clean", "smudge"):
        print("usage: python -m moerge.vcs.filter clean|smudge PATH", file=sys.stderr)
        return 2
    path = argv[1] if len(argv) > 1 else "<stdin>"

    def body() -> int:
        (clean if argv[0] == "clean" else smudge)(sys.stdin.buffer, sys.stdout.buffer, objects(), path)
        sys.stdout.buffer.flush()
        return 0

    return run(body, (FilterError, MoergeError))


def run(body, errors: tuple) -> int:
    """A driver's main: its failures become one ``moerge: error:`` line on stderr (git shows it) and exit 1."""
    try:
        return body()
    except errors as e:
        print(f"moerge: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # git stopped reading (e.g. a pager quit)
        return 1


if __name__ == "__main__":
    sys.exit(main())
