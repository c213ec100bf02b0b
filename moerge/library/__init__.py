"""The expert library: a versioned SQLite catalog over a content-addressed blob store (store.py)."""

from moerge.library.store import Entry, Library, check_name, split_ref

__all__ = ["Entry", "Library", "check_name", "split_ref"]
