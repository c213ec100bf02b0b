"""Sharing a repository's checkpoint objects: git moves the manifests (``git push``/``git fetch``), and
``moerge git push/pull REMOTE`` moves the tensor objects they name, through fsspec (a folder, an S3
bucket, any fsspec URL), sending or fetching only what the other side lacks.

A remote is a prefix holding ``objects/ab/cdef...`` laid out as the local store. Which objects matter
is read from git itself: every tracked checkpoint manifest in every commit reachable from any ref
(``git rev-list --objects --all``), so a pull after ``git fetch`` gets what the fetched commits need.
Objects are verified (size and sha256) before they are sent and after they arrive; they travel through
``io.remote``, as the expert library's blobs do (whole files: a temporary name renamed into place).
"""

from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from moerge.errors import MoergeError
from moerge.io.blobs import BlobError, sha256
from moerge.io.remote import Remote, open_remote
from moerge.vcs import lowrank
from moerge.vcs import manifest as mf
from moerge.vcs.filter import FilterError, smudge
from moerge.vcs.objects import SUFFIX
from moerge.vcs.repo import git, installed, objects, tracked, worktree


@dataclass
class Needed:
    nbytes: int
    users: list[tuple[str, str]] = field(default_factory=list)  # (path, part label)


def referenced(cwd=None, *, keep_all: bool = False) -> dict[str, Needed]:
    """Every object named by a tracked checkpoint in any commit reachable from a ref, with who uses it;
    ``keep_all`` (for gc) also counts commits only the reflogs reach and what the index holds."""
    top = worktree(cwd)
    listing = git("rev-list", "--objects", "--all", *(["--reflog"] if keep_all else []), cwd=top).splitlines()
    blobs: dict[str, str] = {}
    for line in listing:
        sha, _, path = line.partition(" ")
        if path:
            blobs.setdefault(sha, path)
    if keep_all:  # staged, not committed yet, in every worktree's index: "<mode> <sha> <stage>\t<path>"
        trees = [ln[len("worktree "):] for ln in git("worktree", "list", "--porcelain", cwd=top).splitlines()
                 if ln.startswith("worktree ")]
        for tree in trees or [str(top)]:
            if not Path(tree).is_dir():
                continue
            for line in git("ls-files", "-s", cwd=tree, check=False).splitlines():
                meta, _, path = line.partition("\t")
                if meta:
                    blobs.setdefault(meta.split()[1], path)
    if not blobs:
        return {}
    ours = set(tracked(top, sorted(set(blobs.values()))))
    wanted = [(sha, p) for sha, p in blobs.items() if p in ours]
    out: dict[str, Needed] = {}
    if not wanted:
        return out
    proc = subprocess.run(["git", "cat-file", "--batch"], cwd=top, input=("\n".join(s for s, _ in wanted) + "\n").encode(),
                          capture_output=True)
    data, pos = proc.stdout, 0
    for sha, path in wanted:
        end = data.index(b"\n", pos)
        head = data[pos:end].split()
        size = int(head[2]) if len(head) == 3 else 0
        body = data[end + 1:end + 1 + size]
        pos = end + 1 + size + 1
        if not mf.is_manifest(body[:len(mf.MAGIC)]):
            continue
        for p in mf.parse(body, path).parts:
            need = out.setdefault(p.digest, Needed(p.nbytes))
            need.users.append((path, p.label))
    return out


def _remote(url: str, must_exist: bool = False) -> Remote:
    remote = open_remote(url)
    if must_exist and not remote.exists(remote.root):
        raise MoergeError(f"{url}: no such remote (nothing there); check the path, or `moerge git push` to it first")
    return remote


def _listing(remote: Remote) -> tuple[dict[str, int], set[str]]:
    """The remote's objects: plain ones with their sizes, and those kept as low-rank deltas."""
    plain, deltas = {}, set()
    for path, size in remote.find(remote.path("objects")).items():
        parts = path.rstrip("/").split("/")
        if len(parts) < 2 or len(parts[-2]) != 2:
            continue
        if len(parts[-1]) == 62:
            plain[parts[-2] + parts[-1]] = size
        elif len(parts[-1]) == 62 + len(SUFFIX) and parts[-1].endswith(SUFFIX):
            deltas.add(parts[-2] + parts[-1][:62])
    return plain, deltas


def _remote_path(root: str, digest: str, delta: bool = False) -> str:
    return f"{root}/objects/{digest[:2]}/{digest[2:]}" + (SUFFIX if delta else "")


@dataclass
class Transfer:
    moved: int = 0
    bytes: int = 0
    already: int = 0
    missing: list[str] = field(default_factory=list)  # objects neither side has, as "path: tensor"


def push(url: str, cwd=None) -> Transfer:
    """Send the objects the remote lacks (every referenced object we have, and the objects that those
    kept as low-rank deltas are built on)."""
    store = objects(cwd)
    remote = _remote(url)
    plain, deltas = _listing(remote)
    res = Transfer()
    queue = sorted(referenced(cwd).items())
    seen = {d for d, _ in queue}
    while queue:
        digest, need = queue.pop(0)
        if plain.get(digest) == need.nbytes or digest in deltas:  # a same-size damaged copy there: delete it, then push
            res.already += 1
            continue
        try:
            data = store.read(digest, need.nbytes)  # never spread a damaged object (a delta: rebuilt and checked)
        except BlobError as e:
            if e.state == "missing":
                res.missing.append(f"{need.users[0][0]}: {need.users[0][1]}")
                continue
            raise MoergeError(f"{need.users[0][0]}: {need.users[0][1]}: local {e}; restore it (`moerge git pull` from a "
                              "remote that has it) before pushing") from None
        parent = store.delta_parent(digest)
        if parent is not None:  # send the delta as it is kept, and what it is built on
            data = store.lr_path(digest).read_bytes()
            if parent[0] not in seen:
                seen.add(parent[0])
                queue.append((parent[0], Needed(parent[1], need.users)))
        remote.write(_remote_path(remote.root, digest, parent is not None), data, f"object {digest[:12]}")
        res.moved += 1
        res.bytes += len(data)
    return res


def pull(url: str, cwd=None) -> Transfer:
    """Fetch the referenced objects we lack (run ``git fetch`` first for new commits' manifests)."""
    if not installed(cwd):
        raise MoergeError(f"{Path(cwd or '.').resolve()}: moerge's filters are not installed in this clone, so git would store "
                          "the checkpoints pull writes as raw weights; run `moerge git install` first")
    store = objects(cwd)
    remote = _remote(url, must_exist=True)
    res = Transfer()
    needed = referenced(cwd)
    # missing or truncated here: fetched. A damaged one was moved aside when smudge or verify found it, so it is
    # missing too; pull does not re-hash the whole history's objects every time
    todo = {d: n for d, n in needed.items() if not store.has(d, n.nbytes)}
    for d, n in needed.items():  # a delta here whose parent is not (an interrupted pull): fetch the parent
        parent = store.delta_parent(d)
        if parent is not None and not store.has(*parent) and parent[0] not in todo:
            todo[parent[0]] = Needed(parent[1], n.users)
    res.already = len(needed) - len(todo)
    if not todo:
        return res
    plain, deltas = _listing(remote)
    damaged, fetched_deltas = [], []
    queue = sorted(todo.items())
    seen = set(todo)
    while queue:
        digest, need = queue.pop(0)
        delta = digest not in plain and digest in deltas
        if digest not in plain and not delta:
            res.missing.append(f"{need.users[0][0]}: {need.users[0][1]}")
            continue
        remote_path = _remote_path(remote.root, digest, delta)
        data = remote.read(remote_path, f"object {digest[:12]}")
        if delta:  # checked once what it is built on is here too (below)
            try:
                head = lowrank.header(data)
            except lowrank.LowRankError:
                damaged.append((digest, need, remote_path))
                continue
            store.put_delta(digest, data)
            fetched_deltas.append((digest, need, remote_path))
            parent = head["parent"]
            if parent not in seen and not store.has(parent, head["parent_nbytes"]):
                seen.add(parent)
                queue.append((parent, Needed(head["parent_nbytes"], need.users)))
        elif len(data) != need.nbytes or sha256(data) != digest:
            damaged.append((digest, need, remote_path))
            continue  # fetch the others; report the damaged ones at the end
        else:
            store.put(data, repair=True, digest=digest)
        res.moved += 1
        res.bytes += len(data)
    for digest, need, remote_path in fetched_deltas:  # rebuilt and hashed: a damaged delta is moved aside
        state = store.check(digest, need.nbytes)
        if state == "corrupt":
            store.quarantine(digest)
            damaged.append((digest, need, remote_path))
            res.moved -= 1
    if damaged:
        digest, need, remote_path = damaged[0]
        raise MoergeError(f"{url}: {len(damaged)} object(s) are damaged there (their bytes do not match their names), e.g. "
                          f"{digest[:12]} ({need.users[0][0]}: {need.users[0][1]}); delete {remote_path} there and "
                          f"`moerge git push` it again from a clone that has it ({res.moved} other object(s) were fetched)")
    return res


def verify(cwd=None) -> list[str]:
    """Every referenced object that is missing or damaged here, as 'path: tensor: state'; damaged ones are
    moved aside, so that ``pull`` fetches them again."""
    store = objects(cwd)
    problems = []
    for digest, need in sorted(referenced(cwd).items()):
        state = store.check(digest, need.nbytes)
        if state == "corrupt":
            store.quarantine(digest)
            state = "corrupt (moved aside)"
        if state:
            (path, label), more = need.users[0], len({u for u in need.users}) - 1
            problems.append(f"{path}: {label}: object {digest[:12]} is {state}" + (f" (and {more} more uses)" if more else ""))
    return problems


def materialize(cwd=None) -> list[str]:
    """Write out tracked files of the working tree that are still manifests (a clone made before the
    drivers were installed, or whose objects were missing), now that their objects are here; then
    refresh git's index so they show as unchanged. Returns the paths written."""
    top = worktree(cwd)
    store = objects(cwd)
    files = [f for f in git("ls-files", "-z", cwd=top).split("\0") if f]
    written = []
    for rel in tracked(top, files):
        path = top / rel
        try:
            with open(path, "rb") as f:
                if not mf.is_manifest(f.read(len(mf.MAGIC))):
                    continue
        except FileNotFoundError:
            continue
        tmp = path.with_name(f".{path.name}.moerge-{uuid.uuid4().hex}")
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                smudge(src, dst, store, rel)
            tmp.replace(path)
        except FilterError as e:
            raise MoergeError(str(e)) from None
        finally:
            tmp.unlink(missing_ok=True)
        written.append(rel)
    if written:  # their content is what the index holds; re-adding records the new size and time (no new blob)
        git("add", "--", *written, cwd=top)
    return written


def gc(cwd=None, min_age_seconds: float = 3600) -> tuple[int, int]:
    """Delete objects that no tracked checkpoint names (in any commit, reflog entry or the index) and
    that are older than ``min_age_seconds`` (a ``git add`` in flight may not have staged its objects
    yet), and stale temporary files. Returns (objects removed, bytes freed)."""
    import time

    store = objects(cwd)
    keep = set(referenced(cwd, keep_all=True))
    todo = list(keep)
    while todo:  # what kept deltas are built on is kept too
        parent = store.delta_parent(todo.pop())
        if parent is not None and parent[0] not in keep:
            keep.add(parent[0])
            todo.append(parent[0])
    now, removed, freed = time.time(), 0, 0
    for digest in store.digests() - keep:
        for path in (store.path(digest), store.lr_path(digest)):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if now - st.st_mtime >= min_age_seconds:
                path.unlink(missing_ok=True)
                removed += 1
                freed += st.st_size
    if store.tmp.is_dir():
        for p in store.tmp.iterdir():
            if now - p.stat().st_mtime >= min_age_seconds:
                p.unlink(missing_ok=True)
    return removed, freed

