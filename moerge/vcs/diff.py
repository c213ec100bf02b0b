"""``git diff`` for checkpoints: per changed tensor its shape, dtype, relative L2 change, largest absolute
change and share of entries changed; tensors added, removed or reshaped; a one-line summary.

Either side may be a manifest (what git stores; tensors come from the object store) or the checkpoint
itself (the working tree's file), so ``git diff``, ``git diff --cached`` and ``git diff A B`` all work.
Tensors whose bytes did not change are recognised by their sha256 and cost nothing. With
``--textconv FILE`` (what ``git log -p`` and ``git show`` use) it prints one line per tensor, so git's
own line diff shows which tensors a commit changed.

    python -m moerge.vcs.diff PATH OLD OLD_HEX OLD_MODE NEW NEW_HEX NEW_MODE   (git's external diff)
    python -m moerge.vcs.diff --textconv FILE
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moerge.io.blobs import BlobError, BlobStore
from moerge.vcs import manifest as mf
from moerge.vcs.filter import run
from moerge.vcs.repo import objects

NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
             "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}


@dataclass
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    digest: str
    read: Callable[[], bytes]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Side(dict):
    """One side of a diff: its tensors by name, and its header's ``__metadata__``."""

    metadata: dict | None = None


def values(t: Tensor, data: bytes):
    """The tensor's values as a float64 numpy array (None for dtypes numpy cannot read, e.g. FP8)."""
    import numpy as np

    if t.dtype == "BF16":
        u = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return u.view(np.float32).astype(np.float64)
    dt = NP_DTYPES.get(t.dtype)
    return None if dt is None else np.frombuffer(data, dtype=dt).astype(np.float64)


def _from_manifest(m: mf.Manifest, store: BlobStore, where: str) -> dict[str, Tensor]:
    def reader(p: mf.Part):
        def read() -> bytes:
            try:
                return store.read(p.digest, p.nbytes)
            except BlobError as e:
                raise SystemExit(f"moerge: error: {where}: tensor {p.name}: {e}; fetch it with `moerge git pull REMOTE`")
        return read

    side = Side({p.name: Tensor(p.name, p.dtype, p.shape, p.digest, reader(p)) for p in m.parts if p.kind == "tensor"})
    h = mf.header(m, lambda p: reader(p)())
    side.metadata = h.get("__metadata__") if h else None
    return side


def _from_file(path: Path) -> dict[str, Tensor] | None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > mf.MAX_HEADER:
            return None
        parsed = mf.safetensors_header(head + f.read(n))
    if parsed is None:
        return None
    n, header = parsed
    out = Side()
    out.metadata = header.get("__metadata__")
    for name, v in header.items():
        if name == "__metadata__":
            continue
        start, end = v["data_offsets"]

        def read(start=8 + n + start, size=end - start) -> bytes:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(size)
        out[name] = Tensor(name, v["dtype"], tuple(v["shape"]), "", read)
    return out


def load(path: str | None, store: BlobStore | None) -> dict[str, Tensor] | None:
    """A side of a diff: empty for /dev/null, None if it is not a checkpoint."""
    if path is None or path == "/dev/null":
        return Side()
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(len(mf.MAGIC))
    if mf.is_manifest(head):
        m = mf.parse(p.read_bytes(), str(p))
        if store is None:

            store = objects()
        return _from_manifest(m, store, str(p))
    return _from_file(p)


def _digest(t: Tensor) -> str:
    return t.digest or hashlib.sha256(t.read()).hexdigest()


def _shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def compare(old: dict[str, Tensor], new: dict[str, Tensor]) -> dict:
    """Per-tensor changes between two checkpoints and the summary (a dict, JSON-ready)."""
    import numpy as np

    rows, changed_entries, changed_numel, d2, o2 = [], 0, 0, 0.0, 0.0
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            rows.append({"tensor": name, "status": "added", "dtype": b.dtype, "shape": list(b.shape)})
            continue
        if b is None:
            rows.append({"tensor": name, "status": "removed", "dtype": a.dtype, "shape": list(a.shape)})
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            rows.append({"tensor": name, "status": "reshaped", "from": f"{a.dtype} {_shape(a.shape)}",
                         "to": f"{b.dtype} {_shape(b.shape)}"})
            continue
        if _digest(a) == _digest(b):
            continue
        da, db = a.read(), b.read()
        va, vb = values(a, da), values(b, db)
        row = {"tensor": name, "status": "changed", "dtype": b.dtype, "shape": list(b.shape)}
        if va is not None:
            diff = vb - va
            nz = int(np.count_nonzero(diff))
            n_old = float(np.dot(va, va))
            dd = float(np.dot(diff, diff))
            if b.dtype.startswith(("F", "BF")):  # the overall relative change is over floating tensors
                d2, o2 = d2 + dd, o2 + n_old
            row.update(rel_l2=math.sqrt(dd / n_old) if n_old > 0 else (math.inf if dd else 0.0),
                       max_abs=float(np.abs(diff).max()) if diff.size else 0.0, changed_share=nz / max(1, diff.size),
                       changed_entries=nz)
            changed_entries += nz
            changed_numel += b.numel
        rows.append(row)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("changed", "added", "removed", "reshaped")}
    meta_old, meta_new = getattr(old, "metadata", None), getattr(new, "metadata", None)
    metadata = None
    if (old or meta_old) and meta_old != meta_new:
        keys = sorted(set(meta_old or {}) | set(meta_new or {}))
        metadata = {k: [(meta_old or {}).get(k), (meta_new or {}).get(k)] for k in keys
                    if (meta_old or {}).get(k) != (meta_new or {}).get(k)}
    return {"tensors": rows, "metadata": metadata,
            "summary": {**counts, "compared": len(set(old) & set(new)),
                        "changed_share_of_changed_tensors": changed_entries / max(1, changed_numel),
                        "rel_l2_of_changed_tensors": math.sqrt(d2 / o2) if o2 > 0 else None}}


def render(path: str, result: dict) -> str:
    lines = [f"moerge diff {path}"]
    for r in result["tensors"]:
        if r["status"] == "changed":
            if "rel_l2" in r:
                share = f"{r['changed_share']:.1%}" if r["changed_share"] >= 0.001 or not r["changed_entries"] else \
                    f"{r['changed_entries']} of {math.prod(r['shape'])}"
                lines.append(f"  changed   {r['tensor']}  {r['dtype']} {_shape(r['shape'])}  rel L2 {r['rel_l2']:.3g}  "
                             f"max |d| {r['max_abs']:.3g}  entries changed {share}")
            else:
                lines.append(f"  changed   {r['tensor']}  {r['dtype']} {_shape(r['shape'])}  (bytes differ)")
        elif r["status"] == "reshaped":
            lines.append(f"  reshaped  {r['tensor']}  {r['from']} -> {r['to']}")
        else:
            lines.append(f"  {r['status']:<9} {r['tensor']}  {r['dtype']} {_shape(r['shape'])}")
    for k, (a, b) in (result.get("metadata") or {}).items():
        lines.append(f"  metadata  {k}: {a!r} -> {b!r}")
    s = result["summary"]
    rel = "" if s["rel_l2_of_changed_tensors"] is None else f", together rel L2 {s['rel_l2_of_changed_tensors']:.3g}"
    share = f" ({s['changed_share_of_changed_tensors']:.1%} of their entries{rel})" if s["changed"] else ""
    lines.append(f"  summary: {s['changed']} of {s['compared']} tensors changed{share}, {s['added']} added, "
                 f"{s['removed']} removed, {s['reshaped']} reshaped"
                 + (f", {len(result['metadata'])} metadata key(s) changed" if result.get("metadata") else ""))
    return "\n".join(lines) + "\n"


def textconv(path: str) -> str:
    """One line per tensor (name, dtype, shape, content hash): what git's line diff compares."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(len(mf.MAGIC))
    if mf.is_manifest(head):
        m = mf.parse(p.read_bytes(), str(p))
        tensors = [(t.name, t.dtype, t.shape, t.digest) for t in m.parts if t.kind == "tensor"]
    else:
        side = _from_file(p)
        if side is None:
            return f"(not a checkpoint: {p.stat().st_size} bytes)\n"
        tensors = [(t.name, t.dtype, t.shape, _digest(t)) for t in side.values()]
    return "".join(f"{n}  {d} {_shape(s)}  {h[:12]}\n" for n, d, s, h in sorted(tensors))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    as_json = bool(argv) and argv[0] == "--json"
    args = argv[1:] if as_json else argv

    def body() -> int:
        if argv and argv[0] == "--textconv" and len(argv) == 2:
            sys.stdout.write(textconv(argv[1]))
            return 0
        if len(args) < 5:
            print("usage: python -m moerge.vcs.diff PATH OLD OLD_HEX OLD_MODE NEW NEW_HEX NEW_MODE", file=sys.stderr)
            return 2
        path, old, new = args[0], args[1], args[4]
        a, b = load(old, None), load(new, None)
        if a is None or b is None:
            sys.stdout.write(f"moerge diff {path}: not a safetensors checkpoint (on one side or both); bytes differ\n")
            return 0
        res = compare(a, b)
        sys.stdout.write(json.dumps(res) + "\n" if as_json else render(path, res))
        return 0

    return run(body, (mf.ManifestError,))


if __name__ == "__main__":
    sys.exit(main())
