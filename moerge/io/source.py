"""Lazy, read-only tensor sources: a checkpoint seen as ``name -> tensor`` before any data is read.

A source opens a model folder (one ``model.safetensors``, sharded ``*.safetensors`` with or without
an index, or a ``pytorch_model.bin``), a single file, or a hub id resolved to a local snapshot. It
knows every tensor's shape and dtype from headers alone, so a plan can be checked completely before
the first byte of weights is read.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterator, Protocol

import torch

from moerge.errors import MoergeError
from moerge.io.safetensors_file import TensorInfo, read_header, read_tensor


class TensorSource(Protocol):
    """What the merge engine needs of a checkpoint."""

    path: Path

    def names(self) -> list[str]: ...
    def info(self, name: str) -> TensorInfo: ...
    def get(self, name: str) -> torch.Tensor: ...
    def __contains__(self, name: str) -> bool: ...


class _Catalog:
    """Name lookups shared by the sources: ``path`` and ``_infos`` are set by the subclass."""

    path: Path
    _infos: dict[str, TensorInfo]

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise MoergeError(f"{self.path}: has no tensor {name!r}") from None


class SafetensorsSource(_Catalog):
    """One or several safetensors files, read a tensor at a time with positioned reads."""

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            infos, meta = read_header(f)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._infos:
                    raise MoergeError(
                        f"{f}: tensor {name!r} also appears in {self._infos[name].path.name};"
                        " remove the stray shard"
                    )
                self._infos[name] = info
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def get(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return read_tensor(info, self._fd(info.path))

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):  # file descriptors are a scarce resource in long merges
        try:
            self.close()
        except Exception:
            pass


class TorchBinSource(_Catalog):
    """A ``pytorch_model.bin``: loaded with ``weights_only=True`` (never arbitrary unpickling) and
    memory-mapped where the file's format allows it."""

    def __init__(self, path: Path, files: list[Path]):
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        for f in files:
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for corrupt pickles
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise MoergeError(
                    f"{f}: cannot load as a weights-only PyTorch checkpoint ({first[:160]});"
                    " convert it to safetensors"
                ) from None
            if not isinstance(sd, dict):
                raise MoergeError(f"{f}: is not a state dict; save model.state_dict()")
            for name, t in sd.items():
                if isinstance(t, torch.Tensor):
                    self._tensors[name] = t
                    nbytes = t.numel() * t.element_size()
                    self._infos[name] = TensorInfo(name, t.dtype, tuple(t.shape), f, 0, nbytes)

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._tensors[name].clone()


def _indexed_files(folder: Path, index_name: str) -> list[Path] | None:
    index = folder / index_name
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise MoergeError(f"{index}: malformed index (no weight_map); re-download it") from None
    files = sorted({folder / f for f in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise MoergeError(f"{index}: names shard {f.name}, which is missing; re-download it")
    return files


def adapter_folder(path: str | os.PathLike) -> Path | None:
    """The PEFT adapter folder ``path`` is (a folder with adapter_config.json and no model weights) or
    is inside of (its adapter_model file), else None: an adapter is not a model by itself."""
    p = Path(path)
    if p.is_file():
        return p.parent if p.name.startswith("adapter_model") and (p.parent / "adapter_config.json").is_file() else None
    if not (p / "adapter_config.json").is_file():
        return None
    weights = [f for f in p.glob("*.safetensors") if not f.name.startswith("adapter_model")]
    return None if weights or list(p.glob("pytorch_model*.bin")) else p


def open_source(path: str | os.PathLike) -> SafetensorsSource | TorchBinSource:
    """Open a local checkpoint folder or file. Safetensors is preferred over .bin when both exist."""
    p = Path(path)
    if not p.exists():
        raise MoergeError(f"{p}: no such file or folder; check the path or use a hub id (org/name)")
    if p.is_file():
        if p.suffix == ".safetensors":
            return SafetensorsSource(p, [p])
        if p.suffix in (".bin", ".pt", ".pth"):
            return TorchBinSource(p, [p])
        raise MoergeError(f"{p}: unknown checkpoint file type; expected .safetensors or .bin")
    files = _indexed_files(p, "model.safetensors.index.json")
    if files is None:
        files = sorted(p.glob("*.safetensors"))
        files = [f for f in files if not f.name.startswith("adapter_model")]
    if files:
        return SafetensorsSource(p, files)
    bins = _indexed_files(p, "pytorch_model.bin.index.json")
    if bins is None and (p / "pytorch_model.bin").is_file():
        bins = [p / "pytorch_model.bin"]
    if bins:
        return TorchBinSource(p, bins)
    if (p / "adapter_config.json").is_file():
        raise MoergeError(f"{p}: is a PEFT adapter folder (adapter_config.json), not a model; apply it to its base "
                          "(in a recipe: BASE+path/to/adapter)")
    raise MoergeError(
        f"{p}: no model.safetensors, *.safetensors shards or pytorch_model.bin in this folder"
    )


def iter_infos(source: TensorSource) -> Iterator[TensorInfo]:
    for name in source.names():
        yield source.info(name)
