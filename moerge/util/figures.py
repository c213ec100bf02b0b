"""Figures drawn to files (matplotlib's Agg backend: never a window), checked and written whole."""

from __future__ import annotations

import os
from pathlib import Path

from moerge.errors import MoergeError
from moerge.util.files import atomic_file, output_file


def pyplot():
    """matplotlib's pyplot on the Agg backend: files only, never a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FIGURE_FORMATS = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def check_figure(path: str | os.PathLike, what: str = "figure") -> Path:
    """A figure file the command will draw, checked before the work starts (folder, format)."""
    path = output_file(path, what)
    if path.suffix.lower() not in FIGURE_FORMATS:
        raise MoergeError(f"{path}: {what} are drawn as {', '.join(FIGURE_FORMATS)}; give a file name ending in one of them")
    return path


def save_figure(fig, path: Path) -> Path:
    """Write a figure under a temporary name and rename it into place."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=120)
    except OSError as e:
        raise MoergeError(f"{path}: cannot write the figure ({e.strerror or e}); choose another path") from None
    finally:
        pyplot().close(fig)
    return path
