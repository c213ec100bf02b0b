"""Resolving a model reference (local folder or hub id) to a local folder.

Hub ids go through huggingface_hub's snapshot cache, so HF_HUB_OFFLINE, HF_HOME and HF_HUB_CACHE
behave as users expect, and only the files a merge needs (weights, configs, tokenizer) are fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from moerge.errors import MoergeError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
WANTED = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve(ref: str, revision: str | None = None, *, want_bin: bool = False) -> Path:
    """Return a local folder (or file) for ``ref``: the path itself if it exists, else a hub snapshot."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if not HUB_ID.match(ref):
        raise MoergeError(f"{ref}: no such file or folder, and not a hub id (org/name); check the path")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = WANTED + (["*.bin"] if want_bin else [])
    try:
        folder = Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache; download it first"
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            else "cannot reach the hub and it is not cached; check the network or the id"
        )
        raise MoergeError(f"{ref}: {hint}") from None
    except HfHubHTTPError as e:
        raise MoergeError(f"{ref}: the hub refused it ({str(e).splitlines()[0][:120]}); check the id and your token") from None
    except Exception as e:  # repository not found, gated, network errors ...
        raise MoergeError(f"{ref}: cannot fetch from the hub ({type(e).__name__}); check the id") from None
    if not want_bin and not list(folder.glob("*.safetensors")) and list(folder.glob("*.json")):
        # a .bin-only repository: fetch the weights too
        return resolve(ref, revision, want_bin=True)
    return folder
