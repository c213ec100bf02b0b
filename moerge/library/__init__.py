"""The expert library: a versioned SQLite catalog over a content-addressed blob store (store.py)."""

from moerge.library.store import (
    KINDS,
    Entry,
    Library,
    LibraryWarning,
    NothingAdded,
    check_kind,
    check_name,
    library_for,
    split_ref,
)
from moerge.library.summary import describe

__all__ = ["KINDS", "Entry", "Library", "LibraryWarning", "NothingAdded", "check_kind", "check_name", "describe", "library_for", "split_ref"]
