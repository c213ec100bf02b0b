"""A place objects are shared through: a folder or any fsspec URL (``s3://bucket/prefix``, ...).

One implementation for everything that moves content-addressed files between machines: the expert
library's ``push``/``pull`` and ``moerge git push/pull``. It opens the location with one clear line
for a missing filesystem package, an unreachable endpoint or wrong credentials, and writes each
file whole: on a local filesystem under a temporary name, then renamed (object stores' writes are
atomic by themselves), so a transfer cut short never leaves a half-written file under a real name.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from moerge.errors import MoergeError


@dataclass
class Remote:
    fs: object  # an fsspec filesystem
    root: str  # the location's path on that filesystem, without a trailing "/"
    url: str  # as the user gave it, for error lines

    @property
    def local(self) -> bool:
        protocol = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "file" in protocol or "local" in protocol

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def error(self, e: Exception, doing: str = "cannot reach the remote") -> MoergeError:
        """One line for what the filesystem client raised (its own exception types: botocore, aiohttp, ...)."""
        text = (str(e).splitlines() or [""])[0][:160]
        hint = ("; check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or a profile) and, for an S3-compatible "
                "store, FSSPEC_S3_ENDPOINT_URL") if self.url.startswith(("s3://", "s3a://")) else ""
        return MoergeError(f"{self.url}: {doing} ({type(e).__name__}: {text}){hint}")

    def exists(self, path: str) -> bool:
        try:
            return bool(self.fs.exists(path))
        except Exception as e:
            raise self.error(e) from None

    def size(self, path: str) -> int | None:
        """The size of ``path`` there, or None when it is not there."""
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.error(e) from None

    def find(self, path: str) -> dict[str, int]:
        """Every file under ``path`` with its size ({} when there is nothing)."""
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self.error(e) from None
        return {p: int(info.get("size") or 0) for p, info in found.items()}

    def write(self, path: str, data: bytes, what: str = "a file") -> None:
        """Write ``data`` to ``path`` whole."""
        self._whole(path, lambda tmp: self.fs.pipe_file(tmp, data), what)

    def put(self, local_path: str | os.PathLike, path: str, what: str = "a file") -> None:
        """Copy the local file ``local_path`` to ``path`` whole."""
        self._whole(path, lambda tmp: self.fs.put_file(str(local_path), tmp), what)

    def read(self, path: str, what: str = "a file") -> bytes:
        try:
            return self.fs.cat_file(path)
        except Exception as e:
            raise self.error(e, f"cannot read {what}") from None

    def _whole(self, path: str, send, what: str) -> None:
        try:
            if self.local:
                folder, name = path.rsplit("/", 1)
                self.fs.makedirs(folder, exist_ok=True)
                tmp = f"{folder}/.{name}.{uuid.uuid4().hex}"
                try:
                    send(tmp)
                    self.fs.mv(tmp, path)
                except BaseException:
                    if self.fs.exists(tmp):  # a part written before the failure
                        self.fs.rm(tmp)
                    raise
            else:
                send(path)
        except MoergeError:
            raise
        except Exception as e:
            raise self.error(e, f"cannot write {what}") from None


def open_remote(url: str | os.PathLike, must_exist: bool = False, what: str = "remote") -> Remote:
    """The location ``url`` names; with ``must_exist``, one line when nothing is there."""
    import fsspec  # start-up time: fsspec loads its registry of filesystems

    url = str(url)
    if not url.strip():
        raise MoergeError(f"the {what} is empty; give a folder or an fsspec URL such as s3://bucket/team")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise MoergeError(f"{url}: cannot open this {what} ({e}); for s3:// install s3fs (pip install 'moerge[s3]')") from None
    remote = Remote(fs, root.rstrip("/") or root, url)
    if must_exist and not remote.exists(remote.root):
        raise MoergeError(f"{url}: no such {what} (nothing there); check the path")
    return remote
