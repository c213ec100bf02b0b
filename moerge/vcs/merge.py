"""git's merge driver for checkpoints: a parameter-aware, non-interactive three-way merge.

Per tensor, against the common ancestor O: a tensor changed on one side only is taken from that
side; one changed on both sides is merged with a moerge method relative to O; a tensor added on
one side is kept, one removed on one side and untouched on the other is removed. A tensor whose
shape or dtype changed on one side while the other changed its values, or that one side removed and
the other changed, is a conflict: git then reports the file as conflicted, the driver names each
such tensor on one line, and the working file keeps our side.

Methods (``git config moerge.merge.method NAME``, or per path the attribute ``moerge-merge=NAME``):
``average`` (default: O + (dA + dB) / 2, task arithmetic with weight 1/2 each), ``sum`` (O + dA + dB,
both changes kept whole), ``ties`` (TIES relative to O; ``git config moerge.merge.density 0.5``),
``ours``, ``theirs``. Merged tensors are computed in float32 (float64 for float64) and stored back in
the tensor's dtype; the result is a new manifest whose header is rebuilt for the merged tensors.

    python -m moerge.vcs.merge O A B PATH      (git: merge.moerge.driver = ... %O %A %B %P)
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from moerge.io.blobs import BlobError, BlobStore
from moerge.vcs import manifest as mf

METHODS = ("average", "sum", "ties", "ours", "theirs")
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class Conflict(Exception):
    pass


def _same(x: mf.Part | None, y: mf.Part | None) -> bool:
    if x is None or y is None:
        return x is y
    return x.digest == y.digest and x.dtype == y.dtype and x.shape == y.shape


def _tensor(store: BlobStore, p: mf.Part):
    import torch

    data = bytearray(store.read(p.digest, p.nbytes))
    dt = getattr(torch, DTYPES[p.dtype])
    t = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return t.view(dt).reshape(p.shape)


def merge_tensor(store: BlobStore, o: mf.Part, a: mf.Part, b: mf.Part, method: str, density: float) -> mf.Part:
    """Both sides changed this tensor's values: merge relative to the ancestor and store the result."""
    import torch

    from moerge.methods import registry

    if method == "ours":
        return a
    if method == "theirs":
        return b
    if a.dtype not in DTYPES:
        raise Conflict(f"tensor {a.name}: both sides changed it and {a.dtype} tensors are not merged by value; "
                       "resolve it with `git checkout --ours/--theirs` or moerge-merge=ours|theirs")
    to, ta, tb = (_tensor(store, p) for p in (o, a, b))
    work = torch.float64 if ta.dtype == torch.float64 else torch.float32
    base = to.to(work)
    if method == "ties":
        # TIES as recipes run it (normalize: the elected changes are averaged, not summed)
        out = registry.get("ties")(base, [ta.to(work), tb.to(work)], weight=[1.0, 1.0], density=[density, density],
                                   normalize=True)
    else:
        w = 0.5 if method == "average" else 1.0
        out = registry.get("task_arithmetic")(base, [ta.to(work), tb.to(work)], weight=[w, w])
    data = out.to(ta.dtype).contiguous().view(torch.uint8).numpy().tobytes()
    digest, _ = store.put(data, repair=False)
    return mf.Part("tensor", digest, len(data), a.dtype, a.shape, a.name)


def _metadata(store: BlobStore, m: mf.Manifest | None) -> dict | None:
    h = mf.header(m, lambda p: store.read(p.digest, p.nbytes)) if m is not None else None
    return h.get("__metadata__") if h else None


def _build(store: BlobStore, tensors: list[mf.Part], metadata: dict | None) -> mf.Manifest:
    """A safetensors layout for ``tensors`` in this order: a new header and the manifest."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    pos = 0
    for p in tensors:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [pos, pos + p.nbytes]}
        pos += p.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes
    raw = struct.pack("<Q", len(text)) + text
    digest, _ = store.put(raw, repair=False)
    parts = [mf.Part("header", digest, len(raw))] + tensors
    return mf.Manifest(sum(p.nbytes for p in parts), parts)


def merge3(store: BlobStore, o: mf.Manifest | None, a: mf.Manifest, b: mf.Manifest, method: str = "average",
           density: float = 1.0) -> tuple[mf.Manifest, dict, list[str]]:
    """(merged manifest, counts, conflicts). ``o`` is None when the file has no common ancestor."""
    if method not in METHODS:
        raise Conflict(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    ot, at, bt = (o.tensors() if o else {}), a.tensors(), b.tensors()
    order = list(at) + [n for n in bt if n not in at]
    out: list[mf.Part] = []
    counts = {"unchanged": 0, "ours": 0, "theirs": 0, "merged": 0, "added": 0, "removed": 0}
    conflicts: list[str] = []
    for name in order:
        po, pa, pb = ot.get(name), at.get(name), bt.get(name)
        if _same(pa, pb):
            counts["unchanged" if _same(po, pa) else "ours"] += 1
            out.append(pa)
        elif _same(po, pa):  # only theirs changed (or removed, or added)
            if pb is None:
                counts["removed"] += 1
                continue
            counts["theirs" if po is not None else "added"] += 1
            out.append(pb)
        elif _same(po, pb):  # only ours changed
            if pa is None:
                counts["removed"] += 1
                continue
            counts["ours" if po is not None else "added"] += 1
            out.append(pa)
        elif pa is None or pb is None:
            side = "we" if pa is None else "they"
            conflicts.append(f"tensor {name}: {side} removed it and the other side changed it")
            if pa is not None:
                out.append(pa)
        elif po is None:
            conflicts.append(f"tensor {name}: both sides added it with different contents")
            out.append(pa)
        elif pa.shape != pb.shape or pa.dtype != pb.dtype or pa.shape != po.shape or pa.dtype != po.dtype:
            conflicts.append(f"tensor {name}: shape conflict: ancestor {po.dtype} {list(po.shape)}, ours {pa.dtype} "
                             f"{list(pa.shape)}, theirs {pb.dtype} {list(pb.shape)}; a shape change cannot be merged with "
                             "a change of values")
            out.append(pa)
        else:
            try:
                out.append(merge_tensor(store, po, pa, pb, method, density))
                counts["merged"] += 1
            except Conflict as e:
                conflicts.append(str(e))
                out.append(pa)
    meta = _metadata(store, a)
    if a.is_safetensors and b.is_safetensors:
        mo, mb = _metadata(store, o), _metadata(store, b)
        if mb != meta:
            if mo == meta:  # only theirs changed the metadata
                meta = mb
            elif mo != mb:
                counts["metadata kept from ours (both sides changed it)"] = 1
    return _build(store, out, meta), counts, conflicts


def _setting(path: str, key: str, attr: str, default: str) -> tuple[str, str]:
    """(value, where it came from) of a setting: the path's attribute, else git config, else the default."""
    from moerge.vcs.repo import git

    v = git("check-attr", attr, "--", path, check=False).strip().rsplit(": ", 1)[-1] if path else ""
    if v and v not in ("unspecified", "unset", "set"):
        return v, f"the attribute {attr}={v} of {path}"
    v = git("config", "--get", key, check=False).strip()
    return (v, f"git config {key} {v}") if v else (default, "the default")


def settings(path: str) -> tuple[str, float]:
    """The merge method and TIES density for ``path``, checked; a bad one is one line naming its source."""
    import math

    method, where = _setting(path, "moerge.merge.method", "moerge-merge", "average")
    if method not in METHODS:
        raise Conflict(f"{where}: unknown merge method; use one of {', '.join(METHODS)}")
    text, where = _setting(path, "moerge.merge.density", "moerge-merge-density", "1.0")
    try:
        density = float(text)
    except ValueError:
        density = math.nan
    if not (0 < density <= 1):
        raise Conflict(f"{where}: the TIES density must be a number in (0, 1], the share of each change kept")
    return method, density


def main(argv: list[str] | None = None) -> int:
    from moerge.errors import MoergeError
    from moerge.vcs.repo import objects

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3:
        print("usage: python -m moerge.vcs.merge ANCESTOR OURS THEIRS [PATH]", file=sys.stderr)
        return 2
    o_path, a_path, b_path = (Path(x) for x in argv[:3])
    path = argv[3] if len(argv) > 3 else str(a_path)
    try:
        store = objects()
        sides = []
        for p in (o_path, a_path, b_path):
            data = p.read_bytes() if p.is_file() else b""
            sides.append(mf.parse(data, path) if mf.is_manifest(data[:len(mf.MAGIC)]) else (None if not data else data))
        o, a, b = sides
        if not isinstance(a, mf.Manifest) or not isinstance(b, mf.Manifest) or (o is not None and not isinstance(o, mf.Manifest)):
            print(f"moerge: {path}: not a tracked checkpoint on every side; resolve it by hand (git checkout --ours/--theirs)",
                  file=sys.stderr)
            return 1
        method, density = settings(path)
        merged, counts, conflicts = merge3(store, o, a, b, method, density)
    except (Conflict, ValueError) as e:
        print(f"moerge: error: {path}: {e}", file=sys.stderr)
        return 1
    except (mf.ManifestError, MoergeError) as e:
        print(f"moerge: error: {e}", file=sys.stderr)
        return 1
    except BlobError as e:
        print(f"moerge: error: {path}: {e}; fetch the objects with `moerge git pull REMOTE`", file=sys.stderr)
        return 1
    if conflicts:
        for c in conflicts:
            print(f"moerge: conflict: {path}: {c}", file=sys.stderr)
        print(f"moerge: {path}: {len(conflicts)} conflicting tensor(s); the file keeps our side; resolve, `git add`, commit",
              file=sys.stderr)
        return 1
    a_path.write_text(merged.text())  # in place: git made this file, with the mode it wants
    done = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    print(f"moerge: merged {path} ({method}): {done}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
