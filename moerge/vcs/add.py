"""``moerge git add FILE --lora ADAPTER``: stage a checkpoint whose change from its committed version
is a LoRA, keeping each changed weight as the adapter's factors instead of a dense copy.

Opt-in per commit: the user says which adapter explains the change (a PEFT adapter folder, or
``library://NAME[@V]``). For every tensor the adapter targets that differs from the parent revision
(``--from``, default HEAD), a low-rank object is written (``moerge.vcs.lowrank``: exact, residual
included) when it is smaller than half the dense bytes; otherwise, and for every other changed
tensor, the dense object is kept as usual. Then ``git add`` runs: the clean filter finds those objects
already present and writes nothing for them. The manifest git records is the same as a plain
``git add`` would make, so diffs, merges, clones and old checkouts work unchanged.

The expert readers and torch load in the functions that apply a LoRA (``--lora``): the rest of
``moerge git`` starts without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from moerge.errors import MoergeError
from moerge.io.blobs import BlobError, sha256
from moerge.vcs import lowrank
from moerge.vcs import manifest as mf
from moerge.vcs.repo import git, installed, objects, tracked, worktree

WORTH = 0.5  # keep factors only when they take at most this share of the dense bytes


@dataclass
class AddReport:
    files: list[str] = field(default_factory=list)
    factored: int = 0  # tensors kept as factors
    dense_bytes: int = 0  # what those tensors would have cost dense
    stored_bytes: int = 0  # what their low-rank objects cost
    kept_dense: list[str] = field(default_factory=list)  # changed, targeted, but factors did not pay
    untargeted: list[str] = field(default_factory=list)  # changed, and the adapter does not touch them
    already: int = 0  # changed tensors whose objects were there already (an earlier add), as factors

    @property
    def saved(self) -> int:
        return self.dense_bytes - self.stored_bytes


class _ManifestSource:
    """A committed checkpoint as the tensor source ``parse_adapter`` checks an adapter against."""

    def __init__(self, m: mf.Manifest, store, label: str):
        from moerge.io.safetensors_file import TensorInfo

        self.path = Path(label)
        self.parts = m.tensors()
        self.store = store
        self._infos = {n: TensorInfo(n, _torch_dtype(p.dtype), tuple(p.shape), self.path, 0, p.nbytes)
                       for n, p in self.parts.items()}

    def names(self) -> list[str]:
        return list(self.parts)

    def __contains__(self, name: str) -> bool:
        return name in self.parts

    def info(self, name: str):
        return self._infos[name]

    def get(self, name: str):
        import torch

        p = self.parts[name]
        data = bytearray(self.store.read(p.digest, p.nbytes))
        return torch.frombuffer(data, dtype=self._infos[name].dtype).reshape(p.shape) if data else torch.empty(p.shape)


def _torch_dtype(name: str):
    import torch

    from moerge.io.safetensors_file import DTYPES

    return DTYPES.get(name, torch.uint8)


def _updates(lora: str, parent: _ManifestSource, library, model_dir: Path | None = None) -> dict:
    """The adapter's low-rank updates keyed by the checkpoint's tensor names."""
    from moerge.experts.kinds import Dora, LowRank
    from moerge.experts.peft_format import parse_adapter, read_adapter

    if lora.startswith("library://"):
        from moerge.library import Library

        lib = Library.open(library)
        expert = lib.load(lib.get(lora[len("library://"):]).ref)
        missing = [n for n in expert.updates if n not in parent]
        if missing:
            raise MoergeError(f"--lora {lora}: changes {missing[0]!r}, which the committed checkpoint lacks; is it an "
                              "expert of this model?")
    else:
        folder = Path(lora)
        if not folder.exists():
            raise MoergeError(f"--lora {lora}: no such folder; give the PEFT adapter folder that was merged into the "
                              "checkpoint, or library://NAME")
        if not (folder / "adapter_config.json").is_file():
            raise MoergeError(f"--lora {lora}: not a PEFT adapter folder (no adapter_config.json); give the adapter "
                              "that was merged into the checkpoint, or library://NAME")
        config, tensors = read_adapter(folder)
        expert = parse_adapter(config, tensors, parent, f"--lora {lora}", model_dir=model_dir)
    ups = {n: u for n, u in expert.updates.items() if isinstance(u, LowRank) and not isinstance(u, Dora)}
    if not ups:
        raise MoergeError(f"--lora {lora}: has no LoRA factors ({expert.kind}); only LoRA updates are stored as factors")
    return ups


def add(paths: list[str], *, lora: str, rev: str = "HEAD", library=None, cwd=None) -> AddReport:
    """Write low-rank objects for the tensors of ``paths`` (relative to ``cwd``, the repository, as
    ``git -C``) that ``lora`` explains, then ``git add`` them."""
    top = worktree(cwd)
    if not installed(top):
        raise MoergeError(f"{top}: moerge's filters are not installed here; run `moerge git install` first")
    if not paths:
        raise MoergeError("give the checkpoint file(s) to add")
    store = objects(top)
    report = AddReport()
    for given in paths:
        # relative to the repository given (as `git -C DIR add FILE`), not to where the command runs
        path = Path(given) if Path(given).is_absolute() else (Path(cwd or ".") / given).absolute()
        if not path.is_file():
            raise MoergeError(f"{given}: no such file" + ("" if Path(given).is_absolute() else f" in {Path(cwd or '.').absolute()}"))
        try:
            rel = path.resolve().relative_to(top.resolve()).as_posix()
        except ValueError:
            raise MoergeError(f"{given}: is outside the repository {top}") from None
        if not tracked(top, [rel]):
            raise MoergeError(f"{given}: is not tracked by moerge; run `moerge git track '{Path(rel).name}'` (or a pattern) first")
        shown = git("cat-file", "-p", f"{rev}:{rel}", cwd=top, check=False)
        if not shown or not mf.is_manifest(shown.encode()[:len(mf.MAGIC)]):
            raise MoergeError(f"{given}: not committed as a moerge checkpoint at {rev}; commit it once without --lora, "
                              "then add the LoRA-changed version with --lora")
        parent = mf.parse(shown, f"{rev}:{rel}")
        src = _ManifestSource(parent, store, f"{rev}:{rel}")
        # the checkpoint's config.json beside it says how the model names what the checkpoint stores (MoE bases)
        ups = _updates(lora, src, library, path.parent if (path.parent / "config.json").is_file() else None)
        try:
            with open(path, "rb") as f:
                new = mf.split(f, sha256)  # names, digests and offsets of the new file, nothing stored
        except mf.ManifestError as e:
            raise MoergeError(f"{given}: {e}; is the checkpoint complete? (re-save or re-copy it)") from None
        if not new.is_safetensors:
            raise MoergeError(f"{given}: is not a readable safetensors file")
        offsets, pos = {}, 0
        for p in new.parts:  # parts are in file order: each tensor's offset is the sum of the sizes before it
            offsets[p.name] = pos
            pos += p.nbytes
        old = parent.tensors()
        with open(path, "rb") as f:
            for name, p in new.tensors().items():
                o = old.get(name)
                if o is not None and o.digest == p.digest:
                    continue  # unchanged: git add stores nothing for it anyway
                u = ups.get(name)
                if u is None or o is None or o.dtype != p.dtype or o.shape != p.shape or p.dtype not in lowrank.FLOATS:
                    report.untargeted.append(f"{rel}: {name}")
                    continue
                if store.is_delta(p.digest):  # kept as factors by an earlier add
                    report.already += 1
                    continue
                # (stored dense by the clean filter, e.g. after a `git status`: replaced by its factors below)
                f.seek(offsets[name])
                target = f.read(p.nbytes)
                try:
                    parent_raw = store.read(o.digest, o.nbytes)
                except BlobError as e:
                    raise MoergeError(f"{rev}:{rel}: tensor {name}: {e}; run `moerge git pull REMOTE` first") from None
                obj = lowrank.encode(o.digest, parent_raw, target, p.dtype, p.shape,
                                     u.a.float().numpy(), u.b.float().numpy(), u.scale, u.transpose)
                if len(obj) > WORTH * p.nbytes:
                    report.kept_dense.append(f"{rel}: {name}")
                    continue
                store.put_delta(p.digest, obj)
                report.factored += 1
                report.dense_bytes += p.nbytes
                report.stored_bytes += len(obj)
        report.files.append(rel)
    git("add", "--", *report.files, cwd=top)
    return report

