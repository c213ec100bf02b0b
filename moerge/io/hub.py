"""Resolving a model reference (local folder or hub id) to a local folder.

Hub ids go through huggingface_hub's snapshot cache, so HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE
behave as users expect, and only the files a merge needs (weights, configs, tokenizer) are fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moerge.errors import MoergeError
from moerge.io import known_bases

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WANTED = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def _local(ref: str) -> Path | None:
    """``ref`` as an existing local path, else None (a path the OS cannot even look up does not exist)."""
    try:
        p = Path(ref).expanduser()
    except RuntimeError:  # ~user with no such user
        p = Path(ref)
    try:
        return p if p.exists() else None
    except (OSError, ValueError):  # a name too long, a NUL byte
        return None


def looks_local(ref: str) -> bool:
    """A reference only a path could mean: ./x, ../x, /x, ~/x, C:\\x, or anything that is not org/name."""
    return ref.startswith(("/", ".", "~")) or "\\" in ref or not HUB_ID.match(ref)


def _show(ref: str) -> str:
    return ref if ref.isprintable() else repr(ref)


def resolve(ref: str, revision: str | None = None, *, want_bin: bool = False) -> Path:
    """Return a local folder (or file) for ``ref``: the path itself if it exists, else a hub snapshot."""
    local = _local(ref)
    if local is not None:
        return local
    if ref in known_bases.KNOWN and revision is None:  # a real base by name (no hub id has no "/"): its fetched folder
        return known_bases.resolve(ref)
    if looks_local(ref):
        raise MoergeError(f"{_show(ref)}: no such file or folder; check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    nowhere = f"{ref}{at}: no such local folder"
    patterns = WANTED + (["*.bin"] if want_bin else [])
    try:
        folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            why = (f"and hub model {ref}{at} is not in the local hub cache (HF_HUB_OFFLINE is set); check the path, "
                   f"or download it first (`hf download {ref}`{f' --revision {revision}' if revision else ''})")
        else:
            why = f"and hub model {ref}{at} cannot be fetched (no network?) and is not cached; check the path or the network"
        raise MoergeError(f"{nowhere}, {why}") from None
    except GatedRepoError:
        raise MoergeError(f"{ref}: hub model is gated; accept its terms on the hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise MoergeError(f"{nowhere}, and no hub model {ref} (or it is private: log in); check the path or the id") from None
    except RevisionNotFoundError:
        raise MoergeError(f"{ref}: hub model has no revision {revision!r}; check the branch, tag or commit after @") from None
    except HfHubHTTPError as e:
        raise MoergeError(f"{ref}: the hub refused it ({str(e).splitlines()[0][:120]}); check the id and your token") from None
    except Exception as e:  # invalid ids, network errors ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise MoergeError(f"{nowhere}, and cannot fetch hub model {ref}{at} ({first}); check the path or the id") from None
    if not want_bin and not list(folder.glob("*.safetensors")) and list(folder.glob("*.json")):
        # a .bin-only repository: fetch the weights too
        return resolve(ref, revision, want_bin=True)
    return folder


COMMIT = re.compile(r"^[0-9a-f]{40}$")


def snapshot_commit(ref: str, folder: Path) -> str | None:
    """The commit of the hub snapshot ``ref`` was resolved to, or None if ``ref`` is a local path: what
    a saved recipe records (``org/name@<commit>``) so that re-running it reproduces the merge."""
    if _local(ref) is None and folder.parent.name == "snapshots" and COMMIT.match(folder.name):
        return folder.name
    return None
