"""A tensor stored as its parent plus LoRA factors: W = round(W_parent + s·B·A) + residual, bit-exact.

When a commit's checkpoint differs from its parent by a LoRA (an adapter merged in, or a library expert
applied), each changed weight can be kept as the factors (r·(in + out) numbers instead of in·out) and
rebuilt on checkout, like a delta in git's packs. Git still sees the same manifest line (the sha256 of
the exact bytes); only the object store's encoding of that object differs.

Bit-exactness does not rest on reproducing how the checkpoint was made (float32 matmuls differ across
machines and libraries in the last bit). The rebuild here is deterministic everywhere: float64 outer
products accumulated one rank at a time (elementwise IEEE operations, no BLAS, no fused multiply-add),
one rounding to the stored dtype. What it misses of the real bytes is kept as a *residual*: the
integer difference of the bit patterns, modulo 2^bits, which is zero or ±1 almost everywhere and
compresses to little (byte planes, then zlib). Rebuild + residual = the exact bytes, checked by sha256
before use.

Object layout (one file, ``objects/ab/cdef....lr`` beside where the dense object would be)::

    moerge-lowrank 1\\n
    {"parent": digest, "parent_nbytes": n, "nbytes": n, "dtype": "BF16", "shape": [out, in], "scale": s,
     "transpose": false, "rank": r, "residual": k}\\n
    A (r x in, float32) | B (out x r, float32) | residual (k bytes, zlib; 0 when the rebuild is exact)

numpy only (git's filters import this module; torch would slow every checkout).
"""

from __future__ import annotations

import json
import zlib

MAGIC = b"moerge-lowrank 1\n"
FLOATS = ("F64", "F32", "F16", "BF16")
MAX_HEADER = 1 << 16


class LowRankError(Exception):
    pass


def _np():
    import numpy as np

    return np


def _uint(dtype: str):
    np = _np()
    return {"F64": np.uint64, "F32": np.uint32, "F16": np.uint16, "BF16": np.uint16}[dtype]


def to_float64(raw: bytes, dtype: str, shape: tuple[int, ...]):
    """The tensor's values, exactly, as float64."""
    np = _np()
    if dtype == "BF16":  # bfloat16 is the top half of a float32
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(shape)
    kind = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[dtype]
    return np.frombuffer(raw, dtype=kind).astype(np.float64).reshape(shape)


def round_bits(x, dtype: str):
    """float64 values rounded (to nearest, ties to even) to ``dtype``, as its little-endian bit patterns."""
    np = _np()
    if dtype == "F64":
        return x.astype("<f8").view(np.uint64)
    if dtype == "F32":
        return x.astype("<f4").view(np.uint32)
    if dtype == "F16":
        return x.astype("<f2").view(np.uint16)
    # BF16: round the float32 bit pattern to its top 16 bits (no overflow below NaN's patterns); NaN stays
    # a (quiet) NaN
    f = x.astype("<f4")
    b = f.view(np.uint32)
    r = ((b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        r[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return r


ROWS = 64  # rows of B·A built at a time: the block stays in cache while the ranks are summed


def rebuild(parent_raw: bytes, dtype: str, shape: tuple[int, ...], a, b, scale: float, transpose: bool):
    """round(W_parent + scale·B·A) in ``dtype``, as bit patterns, computed the same way on every machine:
    elementwise IEEE operations only (each product and sum rounded once, ranks summed in order), so no
    BLAS or fused multiply-add can change a bit. Blocking by rows does not change any element's result."""
    np = _np()
    w = to_float64(parent_raw, dtype, shape)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    rows, cols = b64.shape[0], a64.shape[1]
    blk = np.empty((min(ROWS, rows), cols), dtype=np.float64)
    tmp = np.empty_like(blk)
    for i in range(0, rows, ROWS):
        j = min(i + ROWS, rows)
        d, t = blk[: j - i], tmp[: j - i]
        d.fill(0.0)
        for k in range(a64.shape[0]):
            np.multiply.outer(b64[i:j, k], a64[k, :], out=t)
            d += t
        d *= float(scale)
        if transpose:
            w[:, i:j] += d.T
        else:
            w[i:j] += d
    return round_bits(w, dtype).reshape(-1)


def _planes(arr) -> bytes:
    """A residual's bytes as byte planes (all low bytes, then the next...): runs of zeros for zlib."""
    np = _np()
    return np.ascontiguousarray(arr.view(np.uint8).reshape(-1, arr.itemsize).T).tobytes()


def _unplanes(data: bytes, uint, n: int):
    np = _np()
    size = np.dtype(uint).itemsize
    return np.frombuffer(data, dtype=np.uint8).reshape(size, n).T.copy().view(uint).reshape(-1)


def encode(parent_digest: str, parent_raw: bytes, target_raw: bytes, dtype: str, shape: tuple[int, ...], a, b,
           scale: float, transpose: bool) -> bytes:
    """The low-rank object for ``target_raw`` (A: r×in, B: out×r, as the weight is stored unless
    ``transpose``). Always exact; whether it is worth keeping is the caller's call (compare sizes)."""
    np = _np()
    if dtype not in FLOATS:
        raise LowRankError(f"{dtype} tensors are not stored as factors (floating-point weights only)")
    if len(shape) != 2:
        raise LowRankError(f"shape {list(shape)}: only matrices are stored as factors")
    a = np.ascontiguousarray(a, dtype="<f4")
    b = np.ascontiguousarray(b, dtype="<f4")
    out_, in_ = (shape[1], shape[0]) if transpose else tuple(shape)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[1] != in_ or b.shape[0] != out_:
        raise LowRankError(f"factors {list(b.shape)}·{list(a.shape)} do not make a {list(shape)} matrix")
    if len(parent_raw) != len(target_raw):
        raise LowRankError("the parent tensor has another size")
    uint = _uint(dtype)
    got = rebuild(parent_raw, dtype, tuple(shape), a, b, scale, transpose)
    want = np.frombuffer(target_raw, dtype=np.dtype(uint).newbyteorder("<"))
    diff = want - got  # modulo 2**bits: exact whatever the values (NaN, sign changes)
    residual = b"" if not diff.any() else zlib.compress(_planes(diff.astype(np.dtype(uint).newbyteorder("<"))), 6)
    head = {"parent": parent_digest, "parent_nbytes": len(parent_raw), "nbytes": len(target_raw), "dtype": dtype,
            "shape": list(shape), "scale": float(scale), "transpose": bool(transpose), "rank": int(a.shape[0]),
            "residual": len(residual)}
    return MAGIC + json.dumps(head, sort_keys=True).encode() + b"\n" + a.tobytes() + b.tobytes() + residual


def header(obj: bytes) -> dict:
    """The object's header (LowRankError if it is not a well-formed low-rank object)."""
    if not obj.startswith(MAGIC):
        raise LowRankError("not a low-rank object")
    end = obj.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER)
    try:
        head = json.loads(obj[len(MAGIC):end]) if end > 0 else None
        r, (o, i) = int(head["rank"]), head["shape"]
        if head["transpose"]:
            o, i = i, o
        want = end + 1 + 4 * r * (i + o) + int(head["residual"])
        if head["dtype"] not in FLOATS or len(obj) != want:
            raise ValueError
    except (ValueError, TypeError, KeyError):
        raise LowRankError("damaged low-rank object (header or length)") from None
    head["_data"], head["_in"], head["_out"] = end + 1, i, o
    return head


def decode(obj: bytes, parent_raw: bytes) -> bytes:
    """The exact bytes the object stands for, given its parent's bytes (the caller checks the sha256)."""
    np = _np()
    h = header(obj)
    if len(parent_raw) != h["parent_nbytes"]:
        raise LowRankError("its parent object has another size")
    r, i, o, pos = h["rank"], h["_in"], h["_out"], h["_data"]
    a = np.frombuffer(obj, dtype="<f4", count=r * i, offset=pos).reshape(r, i)
    b = np.frombuffer(obj, dtype="<f4", count=o * r, offset=pos + 4 * r * i).reshape(o, r)
    uint = np.dtype(_uint(h["dtype"])).newbyteorder("<")
    bits = rebuild(parent_raw, h["dtype"], tuple(h["shape"]), a, b, h["scale"], h["transpose"]).astype(uint)
    if h["residual"]:
        try:
            res = _unplanes(zlib.decompress(obj[pos + 4 * r * (i + o):]), uint, bits.size)
        except (zlib.error, ValueError):
            raise LowRankError("damaged low-rank object (residual)") from None
        bits = bits + res
    out = bits.tobytes()
    if len(out) != h["nbytes"]:
        raise LowRankError("damaged low-rank object (size)")
    return out
