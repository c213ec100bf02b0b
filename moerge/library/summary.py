"""``moerge library show``: one expert version as a few readable lines (``--json`` gives everything).

Cards carry task centroids (k vectors of the hidden size, per embedder): printed whole they are a
thousand lines of floats, so numeric lists are summarised by their shape (``<8 centroids x 128 dims>``).
"""

from __future__ import annotations

import json
import time

from moerge.library.store import GATE_PREFIX, Entry, Library

INLINE = 8  # numeric lists up to this long are printed as they are


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _value(key: str, v) -> str:
    """A card value on one line: long numeric lists (and lists of them) by their shape."""
    if isinstance(v, list):
        if v and all(isinstance(r, list) and r and all(_number(x) for x in r) for r in v):
            dims = {len(r) for r in v}
            d = dims.pop() if len(dims) == 1 else f"{min(len(r) for r in v)}-{max(len(r) for r in v)}"
            noun = "centroids" if "centroid" in key else "rows"
            return f"<{len(v)} {noun} x {d} dims>"
        if v and all(_number(x) for x in v) and len(v) > INLINE:
            return f"<{len(v)} dims>" if "centroid" in key else f"<{len(v)} numbers>"
        if all(isinstance(x, (str, int, float, bool)) or x is None for x in v):
            return ", ".join(map(str, v)) or "-"
    if isinstance(v, float) and key in ("added", "created"):
        return _when(v)
    if isinstance(v, (dict, list)):
        text = json.dumps(v)
        return text if len(text) <= 120 else text[:117] + "..."
    return "-" if v is None else str(v)


def _card_lines(card: dict, indent: str) -> list[str]:
    lines = []
    width = max((len(k) for k in card), default=0)
    for key, v in card.items():
        if isinstance(v, dict) and v:
            lines.append(f"{indent}{key}:")
            lines += _card_lines(v, indent + "  ")
        else:
            lines.append(f"{indent}{key.ljust(width)}  {_value(key, v) if v != {} else '-'}")
    return lines


def describe(lib: Library, entry: Entry) -> list[str]:
    """Readable lines about one expert version: catalog fields, adapter settings, and its card."""
    with lib._db() as db:
        keys = [k for (k,) in db.execute("SELECT key FROM tensors WHERE expert_id = ?", (entry.id,))]
    gates = sum(k.startswith(GATE_PREFIX) for k in keys)
    cfg = entry.adapter_config
    adapter = ", ".join(f"{k}={_value(k, cfg[k])}" for k in ("peft_type", "r", "lora_alpha", "use_dora", "target_modules")
                        if cfg.get(k) not in (None, False, [], {}))
    rows = [
        ("expert", entry.ref),
        ("kind", entry.kind),
        ("task", entry.task or "-"),
        ("tags", ", ".join(entry.tags) or "-"),
        ("contributor", entry.contributor or "-"),
        ("license", entry.license or "-"),
        ("size", f"{entry.nbytes / 1e6:.2f} MB in {len(keys) - gates} tensors"
                 + (f" + PHATGOOSE gates for {gates} modules" if gates else " (no PHATGOOSE gates)")),
        ("digest", entry.digest),
        ("created", _when(entry.created)),
        ("made on", f"base@{entry.base_version}" + (" (the latest base)" if entry.base_version == lib.base().version
                                                     else f" (the latest is {lib.base().ref})")),
    ]
    if adapter:
        rows.append(("adapter", adapter))
    lines = [f"{k.ljust(11)}  {v}" for k, v in rows]
    card = {k: v for k, v in entry.card.items() if k != "lineage"}
    if card:
        lines += ["card:"] + _card_lines(card, "  ")
    if entry.card.get("lineage"):
        lines += ["lineage:"] + _card_lines(entry.card["lineage"], "  ")
    lines.append(f"(everything, centroids included: moerge library show {entry.ref} --json)")
    return lines
