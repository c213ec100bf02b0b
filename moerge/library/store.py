"""The expert library: a SQLite catalog over a content-addressed blob store, bound to one base.

Layout of a library folder::

    library.json         the base it is bound to (reference and fingerprint)
    catalog.sqlite       experts (name, version, kind, task, tags, card) and their tensors (key -> blob)
    blobs/ab/cdef...     one file per distinct tensor content (sha256 of its bytes)
    tmp/                 blobs being written

Why it cannot lose or mix up an expert:
- blobs are written to ``tmp/`` and renamed into place, so a blob file is always complete, and the
  same content is stored once across experts and versions;
- an expert becomes visible only when one SQLite transaction (``BEGIN IMMEDIATE``, WAL) inserts it
  with all its tensor rows; concurrent writers queue on that lock and each gets its own version;
- a writer killed before its commit leaves at most unreferenced blobs, which ``verify`` reports as
  such (not as corruption) and ``gc`` removes; ``rm`` only drops catalog rows for the same reason;
- every adapter is checked against the library's base (names, shapes, and the expert card's base
  fingerprint) before anything is written;
- every blob read (load, export, merge, routing) is checked against its size and sha256, so a damaged
  blob is refused naming expert and tensor, and re-adding the expert rewrites it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from moerge.errors import MoergeError, MoergeWarning
from moerge.experts.card import ADAPTERS, ALIASES, CARD, read_card
from moerge.experts.embed import with_task_embedding
from moerge.experts.peft_format import load_expert_folder, parse_adapter
from moerge.io.blobs import BlobError, BlobStore
from moerge.io.fingerprint import folder_fingerprint
from moerge.io.hub import resolve
from moerge.io.remote import open_remote
from moerge.io.source import open_source
from moerge.lm.base import default_base
from moerge.util.files import atomic_dir

ENV = "MOERGE_LIBRARY"  # the library commands use when given none
BASE_NAME = "base"  # library://base[@N] in a recipe: the library's base (base@N), not an expert


def library_for(library: str | os.PathLike | None, experts=None) -> Path | None:
    """The library a command routes or serves from: the one given, else ``$MOERGE_LIBRARY`` when no
    expert folders are given either (None: there is none)."""
    if library is not None:
        return Path(library)
    return Path(os.environ[ENV]) if not experts and os.environ.get(ENV) else None

FORMAT = 1
GATE_PREFIX = "moerge_gate::"
KINDS = ADAPTERS  # what an expert's kind can be (the one list, in moerge.train.expert); `list --kind` checks against it
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS experts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL,
    task TEXT,
    tags TEXT NOT NULL DEFAULT '[]',
    contributor TEXT,
    license TEXT,
    card TEXT NOT NULL DEFAULT '{}',
    adapter_config TEXT NOT NULL,
    digest TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    created REAL NOT NULL,
    base_version INTEGER NOT NULL DEFAULT 1,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS tensors (
    expert_id INTEGER NOT NULL REFERENCES experts(id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    blob TEXT NOT NULL,
    dtype TEXT NOT NULL,
    shape TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    PRIMARY KEY (expert_id, key)
);
CREATE INDEX IF NOT EXISTS tensors_blob ON tensors (blob);
CREATE TABLE IF NOT EXISTS bases (
    version INTEGER PRIMARY KEY,
    path TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    card TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS experts_task ON experts (task);
"""
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                              torch.int8, torch.uint8, torch.bool)}


def _crash_point(where: str) -> None:
    """Fault injection for the tests: MOERGE_CRASH_AT=<where> kills the process here, as a power cut would."""
    if os.environ.get("MOERGE_CRASH_AT") == where:
        os._exit(137)


def split_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` -> (name, version or None for the latest)."""
    name, _, version = ref.partition("@")
    check_name(name)
    if version and not version.isdigit():
        raise MoergeError(f"{ref!r}: the version after @ must be a number (NAME@2)")
    return name, int(version) if version else None


class LibraryWarning(MoergeWarning):
    """A one-line notice from ``Library.add`` (the same tensors under another name, blobs repaired);
    the CLI prints it."""


class NothingAdded(LibraryWarning):
    """``Library.add`` stored no new version (it only repaired the blobs of an identical one)."""


def check_kind(kind: str) -> str:
    """``kind`` as stored (earlier names such as ``dense`` map to today's), or refused naming the valid ones."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        import difflib

        near = difflib.get_close_matches(kind, KINDS, n=1)
        raise MoergeError(f"unknown expert kind {kind!r}" + (f" (did you mean {near[0]}?)" if near else "")
                          + f"; the kinds are {', '.join(KINDS)}")
    return kind


def _readd_hint(entry: "Entry") -> str:
    """The command that re-adds an expert from the folder it was added from (a rebased one: rebased again)."""
    rebased = entry.card.get("rebased") or {}
    if rebased.get("from"):
        return f"moerge expert rebase {rebased['from']} --name {entry.name}"
    source = (entry.card.get("lineage") or {}).get("source") or "DIR"
    return f"moerge library add {source} --name {entry.name}"


def library_origin(card: dict) -> tuple[str, str] | None:
    """(expert name, folder it was added from) when ``card`` is a library expert's card as the routers
    see it (``load_routed`` names it NAME@V and keeps its lineage), else None (an expert folder)."""
    name = str(card.get("name") or "")
    lineage = card.get("lineage")
    if "gates_path" in card or "@" not in name or not isinstance(lineage, dict):
        return None
    source = lineage.get("source")  # a rebased expert's is a description, and a folder may be gone since
    return name.partition("@")[0], source if source and Path(source).is_dir() else "DIR"


def check_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise MoergeError(f"{name!r} is not a valid expert name: use letters, digits, '.', '_' and '-' (at most 128), "
                          "starting with a letter or digit")
    return name


def _insert(db: sqlite3.Connection, expert: tuple, tensors: list[tuple]) -> None:
    """One expert row and its tensor rows (key, blob, dtype, shape, nbytes), inside the caller's transaction."""
    cur = db.execute("INSERT INTO experts (name, version, kind, task, tags, contributor, license, card, adapter_config,"
                     " digest, nbytes, created, base_version) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", expert)
    db.executemany("INSERT INTO tensors (expert_id, key, blob, dtype, shape, nbytes) VALUES (?,?,?,?,?,?)",
                   [(cur.lastrowid, *r) for r in tensors])


@dataclass
class Entry:
    """One expert version in the catalog."""

    id: int
    name: str
    version: int
    kind: str
    task: str | None
    tags: list[str]
    contributor: str | None
    license: str | None
    card: dict
    adapter_config: dict
    digest: str
    nbytes: int
    created: float
    base_version: int = 1  # the library base version it was made on (base@N)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class BaseVersion:
    """One base in the library's chain: base@1 is the base the library was created for; base@N+1 was
    fused from contributions made on base@N (``moerge fuse``), and its card holds that lineage."""

    version: int
    path: Path
    fingerprint: str
    card: dict
    created: float

    @property
    def ref(self) -> str:
        return f"base@{self.version}"


class Library:
    def __init__(self, root: Path):
        self.root = Path(root)
        meta = self.root / "library.json"
        if not meta.is_file():
            raise MoergeError(f"{self.root}: not an expert library (no library.json); name one with --library DIR (or "
                              "$MOERGE_LIBRARY), or create one with `moerge library init`")
        self.meta = json.loads(meta.read_text())
        self.blobs = self.root / "blobs"
        self.tmp = self.root / "tmp"
        self.store = BlobStore(self.blobs, self.tmp)
        self._migrate()

    def _migrate(self) -> None:
        """Libraries made before base versions existed: every expert was made on base@1."""
        with self._db() as db:
            cols = {r[1] for r in db.execute("PRAGMA table_info(experts)")}
            has_bases = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'bases'").fetchone()
        if "base_version" in cols and has_bases:
            return
        with self._db(write=True) as db:
            if "base_version" not in {r[1] for r in db.execute("PRAGMA table_info(experts)")}:
                db.execute("ALTER TABLE experts ADD COLUMN base_version INTEGER NOT NULL DEFAULT 1")
            db.execute("CREATE TABLE IF NOT EXISTS bases (version INTEGER PRIMARY KEY, path TEXT NOT NULL, fingerprint TEXT "
                       "NOT NULL, card TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL)")

    # ------------------------------------------------------------------ creation and access

    @classmethod
    def init(cls, root: str | os.PathLike, base: str | os.PathLike | None = None) -> "Library":
        """A new library at ``root`` bound to ``base`` (a folder, hub id or real base's name; None: the
        built-in base)."""
        root = Path(root)
        if base is None:
            base = default_base()
        if (root / "library.json").exists():
            raise MoergeError(f"{root}: already holds a library")
        base_dir = resolve(str(base))
        meta = {"format": FORMAT, "base": str(base), "base_path": str(Path(base_dir).resolve()),
                "base_fingerprint": folder_fingerprint(base_dir), "created": time.time()}
        return cls._create(root, meta)

    @classmethod
    def _create(cls, root: Path, meta: dict) -> "Library":
        """Lay out an empty library; it exists once ``library.json`` is renamed into place, last."""
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        with sqlite3.connect(root / "catalog.sqlite") as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        tmp = root / f".library.json.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, root / "library.json")
        return cls(root)

    @classmethod
    def open(cls, root: str | os.PathLike | None = None) -> "Library":
        return cls(Path(root or os.environ.get(ENV) or "."))

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.root / "catalog.sqlite", timeout=60, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=60000")
            if write:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            else:
                yield db
        finally:
            db.close()

    # ------------------------------------------------------------------ base versions

    def bases(self) -> list[BaseVersion]:
        """The chain of bases, oldest first: base@1 (the library's own), then each fused one."""
        first = BaseVersion(1, Path(self.meta["base_path"]), self.meta["base_fingerprint"],
                            {"source": self.meta["base"], "origin": "the base the library was created for"},
                            self.meta.get("created", 0.0))
        with self._db() as db:
            rows = db.execute("SELECT version, path, fingerprint, card, created FROM bases ORDER BY version").fetchall()
        return [first] + [BaseVersion(v, self.root / p, fp, json.loads(c), t) for v, p, fp, c, t in rows]

    def base(self, version: int | None = None) -> BaseVersion:
        """base@``version``, or the latest (the one contributions are made on now)."""
        chain = self.bases()
        if version is None:
            return chain[-1]
        for b in chain:
            if b.version == version:
                return b
        bases = "its only base is base@1" if len(chain) == 1 else f"its bases are base@1..base@{chain[-1].version}"
        raise MoergeError(f"{self.root}: has no base@{version}; {bases} "
                          "(`moerge library bases`)")

    def base_source(self, version: int | None = None):
        """The tensors of base@``version`` (default: the latest)."""
        b = self.base(version)
        if not b.path.exists():
            what = self.meta["base"] if b.version == 1 else b.ref
            raise MoergeError(f"{self.root}: its {b.ref} ({what}) is no longer at {b.path}; restore it there")
        return open_source(b.path)

    def register_base(self, folder: Path, card: dict, parent: int) -> BaseVersion:
        """Make ``folder`` (a complete model folder under ``bases/``) base@parent+1, in one transaction; refused
        when another base was registered on ``parent`` meanwhile (the contributions were made on it)."""
        folder = Path(folder)
        rel = folder.resolve().relative_to(self.root.resolve())
        fp = folder_fingerprint(folder)
        with self._db(write=True) as db:
            (latest,) = db.execute("SELECT COALESCE(MAX(version), 1) FROM bases").fetchone()
            if latest != parent:
                raise MoergeError(f"{self.root}: base@{latest} appeared while base@{parent + 1} was being fused from "
                                  f"contributions on base@{parent}; fuse again from base@{latest}'s contributions")
            _crash_point("before-base-commit")
            db.execute("INSERT INTO bases (version, path, fingerprint, card, created) VALUES (?,?,?,?,?)",
                       (parent + 1, str(rel), fp, json.dumps(card), time.time()))
        return self.base(parent + 1)

    def version_of(self, fingerprint: str) -> BaseVersion | None:
        """The base version with this fingerprint, if any."""
        return next((b for b in self.bases() if b.fingerprint == fingerprint), None)

    # ------------------------------------------------------------------ blobs

    def _blob_path(self, digest: str) -> Path:
        return self.store.path(digest)

    def _put_blob(self, data: bytes) -> tuple[str, bool]:
        """Store ``data`` once; returns (its sha256, whether a damaged copy already there was rewritten):
        re-adding an expert repairs a corrupt blob instead of keeping it."""
        return self.store.put(data, repair=True)

    def _get_blob(self, digest: str, dtype: str, shape: list[int], nbytes: int, entry: "Entry", key: str) -> torch.Tensor:
        """A tensor from its blob, checked against the catalog (size and sha256: about 1 ms per MB)."""
        try:
            data = self.store.read(digest, nbytes)
        except BlobError as e:
            what = f" ({e.detail})" if e.detail else ""
            raise MoergeError(f"{self.root}: {entry.ref} tensor {key}: its blob {digest[:12]} is {e.state}{what}; run `moerge "
                              f"library verify`, then re-add the expert (`{_readd_hint(entry)}` rewrites it)") from None
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return t.view(DTYPES[dtype]).reshape(shape)

    # ------------------------------------------------------------------ experts

    def add(self, adapter_dir: str | os.PathLike, name: str, *, task: str | None = None, tags: list[str] | tuple = (),
            contributor: str | None = None, license: str | None = None, prompts: list[str] | None = None,
            embedder: str | os.PathLike | None = None, source: str | None = None) -> Entry:
        """Store a PEFT adapter folder (or a full fine-tune's changed tensors) as the next version of ``name``.
        With ``prompts`` (a few hundred of its task's), the stored card gets their task centroids (by the
        library's base, or by ``embedder``), so task-level routers can route to an adapter from a hub.

        Refused when a version of ``name`` already holds the same content (tensors, PHATGOOSE gates,
        adapter config, card and task): nothing would change. The same tensors under another name are added, with a
        ``LibraryWarning``. Blobs found damaged on the way are rewritten (``NothingAdded`` if that is
        all that happened)."""
        check_name(name)
        if name.lower() == BASE_NAME:
            raise MoergeError(f"{name!r}: reserved for the library's base (a recipe names it library://base or "
                              "library://base@N); give the expert another --name")
        adapter_dir = Path(adapter_dir)
        current = self.base()
        card = read_card(adapter_dir)
        made_on = card.get("base_fingerprint")
        if made_on and made_on != current.fingerprint:
            older = self.version_of(made_on)
            if older is not None:
                raise MoergeError(f"{adapter_dir}: was made on {older.ref} of this library, but contributions now go to "
                                  f"{current.ref}; re-apply it there: moerge expert rebase {adapter_dir} --library {self.root} "
                                  f"--name {name} (or retrain it on {current.path})")
        # names, shapes and the base itself (check_base): the one check every command shares
        expert = load_expert_folder(adapter_dir, self.base_source())
        cb = card.get("centroid_base")
        if cb and cb != current.fingerprint:
            raise MoergeError(f"{adapter_dir}: its task centroids were computed on another base ({cb}); record them on this "
                              f"library's base: moerge expert embed {adapter_dir} --base {current.path}")
        if prompts:

            card, _ = with_task_embedding(card, prompts, base=current.path, embedder=embedder)
        config, tensors = expert.config, expert.tensors
        # ``source``: what the expert came from when ``adapter_dir`` is a scratch folder (expert rebase)
        card["lineage"] = {"source": source or str(adapter_dir.resolve()), "digest": expert.digest(),
                           "base_fingerprint": current.fingerprint, "base_version": current.version, "added": time.time()}
        gates_file = adapter_dir / "gates.safetensors"  # PHATGOOSE gates travel with their expert
        if gates_file.is_file():
            from safetensors.torch import load_file

            tensors = dict(tensors) | {GATE_PREFIX + k: v for k, v in load_file(gates_file).items()}
        rows, repaired = [], 0
        for key, t in sorted(tensors.items()):
            t = t.contiguous()
            data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
            blob, fixed = self._put_blob(data)
            repaired += fixed
            rows.append((key, blob, str(t.dtype), json.dumps(list(t.shape)), len(data)))
        _crash_point("after-blobs")
        task = task or card.get("task")
        digest = expert.digest()
        fixed_note = f"rewrote {repaired} damaged blob{'s' * (repaired != 1)} from {adapter_dir}"
        with self._db(write=True) as db:
            same, twin = self._same_content(db, name, digest, task, card, config, rows)
            if same is None:
                (version,) = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM experts WHERE name = ?", (name,)).fetchone()
                _insert(db, (name, version, expert.kind, task, json.dumps(sorted(set(tags))), contributor, license,
                             json.dumps(card), json.dumps(config), digest, sum(r[4] for r in rows), time.time(),
                             current.version), rows)
                _crash_point("before-commit")
        if same is not None:
            if repaired:
                warnings.warn(f"{same}: {fixed_note}; nothing added (the folder is identical to {same})", NothingAdded, stacklevel=2)
                return self.get(same)
            raise MoergeError(f"{source or adapter_dir}: identical to {same}; nothing added (same tensors, gates, adapter config, "
                              "card and task)")
        if repaired:
            warnings.warn(f"{name}@{version}: {fixed_note}", LibraryWarning, stacklevel=2)
        if twin:
            warnings.warn(f"{source or adapter_dir}: same tensors as {twin}; added as {name}@{version} anyway (no new bytes "
                          "stored)",
                          LibraryWarning, stacklevel=2)
        return self.get(f"{name}@{version}")

    @staticmethod
    def _same_content(db: sqlite3.Connection, name: str, digest: str, task: str | None, card: dict, config: dict,
                      rows: list[tuple]) -> tuple[str | None, str | None]:
        """(a version of ``name`` with exactly this content, else None; a version of another name with
        the same adapter tensors when no version of ``name`` has them, else None), read inside the
        adding transaction."""
        def bare(c: dict) -> dict:
            return {k: v for k, v in c.items() if k != "lineage"}

        mine = json.loads(json.dumps(bare(card)))
        my_config = json.loads(json.dumps(config))
        blobs = sorted((r[0], r[1]) for r in rows)
        same = twin = None
        found = db.execute("SELECT id, name, version, task, card, adapter_config FROM experts WHERE digest = ? "
                           "ORDER BY name, version", (digest,)).fetchall()
        for eid, ename, version, etask, ecard, econfig in found:
            if ename != name:
                twin = twin or f"{ename}@{version}"
            elif (same is None and etask == task and bare(json.loads(ecard)) == mine and json.loads(econfig) == my_config
                  and sorted(db.execute("SELECT key, blob FROM tensors WHERE expert_id = ?", (eid,)).fetchall()) == blobs):
                same = f"{ename}@{version}"
        if any(ename == name for _, ename, *_ in found):
            twin = None  # a new version of the same tensors under their own name (new card or gates): no notice
        return same, twin

    def _entry(self, row) -> Entry:
        return Entry(row[0], row[1], row[2], ALIASES.get(row[3], row[3]), row[4], json.loads(row[5]), row[6], row[7], json.loads(row[8]),
                     json.loads(row[9]), row[10], row[11], row[12], row[13])

    _COLUMNS = ("id, name, version, kind, task, tags, contributor, license, card, adapter_config, digest, nbytes, created, "
                "base_version")

    def get(self, ref: str) -> Entry:
        name, version = split_ref(ref)
        with self._db() as db:
            if version is None:
                row = db.execute(f"SELECT {self._COLUMNS} FROM experts WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)).fetchone()
            else:
                row = db.execute(f"SELECT {self._COLUMNS} FROM experts WHERE name = ? AND version = ?", (name, version)).fetchone()
        if row is None:
            raise MoergeError(f"{self.root}: no expert {ref!r}; see `moerge library list`")
        return self._entry(row)

    def experts(self, *, task: str | None = None, tag: str | None = None, kind: str | None = None, latest: bool = False,
                base_version: int | None = None) -> list[Entry]:
        """The catalog's experts (every version; ``latest``: each name's newest), optionally only those
        made on base@``base_version``."""
        where, args = [], []
        if base_version is not None:
            where.append("base_version = ?")
            args.append(base_version)
        if kind is not None:
            kind = check_kind(kind)
        if task:
            where.append("task = ?")
            args.append(task)
        if kind:  # rows written before a kind was renamed keep its earlier name
            names = [kind] + [old for old, new in ALIASES.items() if new == kind]
            where.append(f"kind IN ({','.join('?' * len(names))})")
            args += names
        if latest:
            where.append("version = (SELECT MAX(version) FROM experts e2 WHERE e2.name = experts.name)")
        sql = f"SELECT {self._COLUMNS} FROM experts" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY name, version"
        with self._db() as db:
            entries = [self._entry(r) for r in db.execute(sql, args)]
        return [e for e in entries if tag is None or tag in e.tags]

    def gates(self, ref: str) -> dict[str, torch.Tensor] | None:
        """The expert's PHATGOOSE gates by module, if it was added with them."""
        g = {k[len(GATE_PREFIX):]: v for k, v in self.tensors(ref, gates=True).items()}
        return g or None

    def tensors(self, ref: str, gates: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors as they were added (original PEFT keys), or with ``gates`` only its
        PHATGOOSE gates (prefixed keys): only the blobs asked for are read, each checked against its
        size and sha256, so a damaged blob is refused by name instead of being used."""
        entry = self.get(ref)
        with self._db() as db:
            rows = db.execute("SELECT key, blob, dtype, shape, nbytes FROM tensors WHERE expert_id = ?", (entry.id,)).fetchall()
        out = {}
        for key, blob, dtype, shape, nbytes in rows:
            if key.startswith(GATE_PREFIX) == gates:
                out[key] = self._get_blob(blob, dtype, json.loads(shape), nbytes, entry, key)
        return out

    def load(self, ref: str):
        """The expert as an Expert (updates keyed by base tensor names), checked against the base."""
        entry = self.get(ref)
        expert = parse_adapter(entry.adapter_config, self.tensors(ref), self.base_source(entry.base_version),
                               f"library:{entry.ref}")
        return expert

    def export(self, ref: str, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write a PEFT adapter folder (``PeftModel.from_pretrained`` loads it) plus the expert card."""
        from safetensors.torch import save_file

        entry = self.get(ref)
        tensors = self.tensors(entry.ref)
        if entry.kind == "full":
            return self._export_model(entry, tensors, Path(out_dir), overwrite)
        with atomic_dir(Path(out_dir), overwrite) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
            g = self.gates(entry.ref)
            if g:
                save_file(g, tmp / "gates.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(entry.adapter_config, indent=2) + "\n")
            card = dict(entry.card) | {"library_ref": entry.ref, "base_fingerprint": self.base(entry.base_version).fingerprint}
            (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
        return Path(out_dir)

    def _export_model(self, entry: Entry, changed: dict[str, torch.Tensor], out: Path, overwrite: bool) -> Path:
        """A full fine-tune as a whole model folder: the base's tensors with the expert's changes, and
        the base's config and tokenizer files."""
        from safetensors.torch import save_file

        base = self.base_source(entry.base_version)
        base_dir = self.base(entry.base_version).path
        with atomic_dir(out, overwrite) as tmp:
            save_file({n: changed[n] if n in changed else base.get(n) for n in base.names()},
                      tmp / "model.safetensors", metadata={"format": "pt"})
            for f in base_dir.iterdir() if base_dir.is_dir() else []:
                if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja") and not f.name.endswith(".index.json"):
                    (tmp / f.name).write_bytes(f.read_bytes())
            (tmp / CARD).write_text(json.dumps(dict(entry.card) | {"library_ref": entry.ref}, indent=2) + "\n")
        return out

    def remove(self, ref: str) -> list[str]:
        """Drop ``NAME@V`` (or every version of ``NAME``) from the catalog; ``gc`` frees the blobs."""
        name, version = split_ref(ref)
        with self._db(write=True) as db:
            if version is None:
                rows = db.execute("SELECT version FROM experts WHERE name = ?", (name,)).fetchall()
                db.execute("DELETE FROM experts WHERE name = ?", (name,))
            else:
                rows = db.execute("SELECT version FROM experts WHERE name = ? AND version = ?", (name, version)).fetchall()
                db.execute("DELETE FROM experts WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise MoergeError(f"{self.root}: no expert {ref!r}; see `moerge library list`")
        return [f"{name}@{v}" for (v,) in rows]

    # ------------------------------------------------------------------ transfer

    def push(self, dest: str | os.PathLike) -> list[str]:
        """Copy every expert version that ``dest`` lacks, sending only the blobs it lacks, and the fused
        base versions it lacks (first, so that every expert arrives with the base it was made on).

        ``dest`` is an fsspec URL or path; a missing library there is created for the same base. The
        blobs travel through fsspec; the catalog rows are then committed in ``dest``'s own SQLite
        transaction, so a transfer cut short leaves ``dest`` with unreferenced blobs only. A name and
        version that exist on both sides with different contents are a conflict: nothing is copied.
        """
        remote = open_remote(dest, what="library location")
        if not remote.local:  # the catalog is SQLite, which needs a filesystem; the blobs alone could go anywhere
            raise MoergeError(f"{dest}: only local library locations are supported so far (got {remote.fs.protocol})")
        target = Path(remote.root)
        other = Library(target) if (target / "library.json").exists() else Library._create(target, self.meta)
        if other.meta["base_fingerprint"] != self.meta["base_fingerprint"]:
            raise MoergeError(f"{dest}: is a library of another base ({other.meta['base']}, "
                              f"{other.meta['base_fingerprint']}); push only between libraries of one base")
        theirs = {e.ref: e.digest for e in other.experts()}
        mine, their_chain = self.bases(), other.bases()
        for b in their_chain[1:]:  # their chain must be a beginning of ours: fused bases are never merged
            if b.version > len(mine) or mine[b.version - 1].fingerprint != b.fingerprint:
                what = "has no such version here" if b.version > len(mine) else "differs from ours"
                raise MoergeError(f"{dest}: its base@{b.version} {what}: the two libraries fused different bases; "
                                  "push to a new location, or pull from it instead, nothing was copied")
        todo = []
        for e in self.experts():
            if e.ref in theirs:
                if theirs[e.ref] != e.digest:
                    raise MoergeError(f"{dest}: already has {e.ref} with other contents; rename one of them before syncing")
                continue
            todo.append(e)
        copied = [self._push_base(b, other, dest) for b in mine[len(their_chain):]]
        for e in todo:
            with self._db() as db:
                rows = db.execute("SELECT key, blob, dtype, shape, nbytes FROM tensors WHERE expert_id = ?", (e.id,)).fetchall()
            for key, blob, dtype, shape, n in rows:
                there = str(other._blob_path(blob))
                if remote.size(there) != n:
                    self._get_blob(blob, dtype, json.loads(shape), n, e, key)  # never spread a damaged blob
                    remote.put(self._blob_path(blob), there, f"blob {blob[:12]}")
            with other._db(write=True) as db:
                if db.execute("SELECT 1 FROM experts WHERE name = ? AND version = ?", (e.name, e.version)).fetchone():
                    raise MoergeError(f"{dest}: {e.ref} appeared there during the transfer; run it again")
                _insert(db, (e.name, e.version, e.kind, e.task, json.dumps(e.tags), e.contributor, e.license,
                             json.dumps(e.card), json.dumps(e.adapter_config), e.digest, e.nbytes, e.created,
                             e.base_version), rows)
            copied.append(e.ref)
        return copied

    def _push_base(self, b: BaseVersion, other: "Library", dest) -> str:
        """Copy fused base ``b`` into ``other`` (under a temporary name, renamed when complete, checked by
        fingerprint) and register it there as the same version."""
        if not b.path.is_dir():
            raise MoergeError(f"{self.root}: its {b.ref} is no longer at {b.path}; restore it there before pushing")
        target = other.root / "bases" / f"v{b.version}"
        part = other.tmp / f"base-v{b.version}.{uuid.uuid4().hex}"
        try:
            shutil.copytree(b.path, part)
            if folder_fingerprint(part) != b.fingerprint:
                raise MoergeError(f"{self.root}: {b.ref}'s folder {b.path} changed since it was fused (its fingerprint "
                                  "differs); restore it, nothing of it was copied")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():  # left by a push or fusion that stopped before registering it
                shutil.rmtree(target)
            os.replace(part, target)
        finally:
            shutil.rmtree(part, ignore_errors=True)
        other.register_base(target, b.card, b.version - 1)
        return b.ref

    def pull(self, src: str | os.PathLike) -> list[str]:
        """Copy what ``src`` (another library of the same base) has and this one lacks."""
        return Library(Path(open_remote(src, what="library location").root)).push(self.root)

    # ------------------------------------------------------------------ integrity

    def _referenced(self) -> dict[str, list[tuple[str, str, int]]]:
        with self._db() as db:
            rows = db.execute("SELECT t.blob, e.name || '@' || e.version, t.key, t.nbytes FROM tensors t JOIN experts e"
                              " ON e.id = t.expert_id").fetchall()
        refs: dict[str, list[tuple[str, str, int]]] = {}
        for blob, ref, key, n in rows:
            refs.setdefault(blob, []).append((ref, key, n))
        return refs

    def _stored(self) -> set[str]:
        return self.store.digests()

    def verify(self) -> tuple[list[str], list[str]]:
        """Re-hash every referenced blob. Returns (problems naming expert and tensor, unreferenced blobs)."""
        problems = []
        refs = self._referenced()
        for blob, users in sorted(refs.items()):
            state = self.store.check(blob, users[0][2])
            if state:
                problems += [f"{ref} tensor {key}: blob {blob[:12]} is {state}" for ref, key, _ in users]
        return problems, sorted(self._stored() - set(refs))

    def gc(self, min_age_seconds: float = 3600) -> int:
        """Delete unreferenced blobs (and stale temporary files) older than ``min_age_seconds``: younger
        ones may belong to an add that has not committed yet."""
        now = time.time()
        removed = 0
        referenced = set(self._referenced())
        for blob in self._stored() - referenced:
            path = self._blob_path(blob)
            if now - path.stat().st_mtime >= min_age_seconds:
                path.unlink(missing_ok=True)
                removed += 1
        for p in self.tmp.iterdir():
            if now - p.stat().st_mtime >= min_age_seconds:
                p.unlink(missing_ok=True)
        return removed

    def stats(self) -> dict:
        stored = self._stored()
        with self._db() as db:
            n_experts, logical = db.execute("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM experts").fetchone()
        return {"experts": n_experts, "logical_bytes": logical, "blobs": len(stored),
                "stored_bytes": sum(self._blob_path(b).stat().st_size for b in stored)}
