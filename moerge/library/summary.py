"""``moerge library show``: one expert version as a few readable lines (``--json`` gives everything);
its card summarised as ``moerge expert show`` does (``experts.card.card_lines``)."""

from __future__ import annotations

from moerge.experts.card import card_lines, card_value, when
from moerge.library.store import GATE_PREFIX, Entry, Library


def describe(lib: Library, entry: Entry) -> list[str]:
    """Readable lines about one expert version: catalog fields, adapter settings, and its card."""
    with lib._db() as db:
        keys = [k for (k,) in db.execute("SELECT key FROM tensors WHERE expert_id = ?", (entry.id,))]
    gates = sum(k.startswith(GATE_PREFIX) for k in keys)
    cfg = entry.adapter_config
    adapter = ", ".join(f"{k}={card_value(k, cfg[k])}" for k in ("peft_type", "r", "lora_alpha", "use_dora", "target_modules")
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
        ("created", when(entry.created)),
        ("made on", f"base@{entry.base_version}" + (" (the latest base)" if entry.base_version == lib.base().version
                                                     else f" (the latest is {lib.base().ref})")),
    ]
    if adapter:
        rows.append(("adapter", adapter))
    lines = [f"{k.ljust(11)}  {v}" for k, v in rows]
    card = {k: v for k, v in entry.card.items() if k != "lineage"}
    if card:
        lines += ["card:"] + card_lines(card, "  ")
    if entry.card.get("lineage"):
        lines += ["lineage:"] + card_lines(entry.card["lineage"], "  ")
    lines.append(f"(everything, centroids included: moerge library show {entry.ref} --json)")
    return lines
