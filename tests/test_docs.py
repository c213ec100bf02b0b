"""The manual beside the code: the documentation site builds, the README stays a front page, and the
architecture page draws the floor plan that tests/test_architecture.py checks.

The site is mkdocs-material under docs/ (mkdocs.yml at the root); ``pip install -e '.[docs]'`` (or
``.[test]``) installs it, and ``mkdocs serve`` shows it while you write.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"

SETUP = "pip install torch==2.13.0 && pip install -e . && moerge demo"
TEST = "pip install -e '.[test]' && OMP_NUM_THREADS=1 python -m pytest"


def test_the_site_builds_strictly(tmp_path):
    """Every page in the nav, every link and anchor resolving, the API page rendering: no warning."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
        pytest.skip("mkdocs or mkdocstrings is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"


def test_the_readme_is_a_front_page_that_starts_with_the_setup_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it to 200 and move the rest to docs/"
    first_block = re.search(r"^```[^\n]*\n(.*?)^```", README.read_text(), re.S | re.M)
    assert first_block, "README.md has no code block"
    assert SETUP in first_block.group(1), f"README.md's first code block lost the set-up command: {SETUP}"
    assert TEST in first_block.group(1), f"README.md's first code block lost the test command: {TEST}"


def _floors() -> list[list[str]]:
    spec = importlib.util.spec_from_file_location("_floor_plan", ROOT / "tests" / "test_architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FLOORS


def test_the_architecture_page_draws_the_floor_plan():
    """docs/architecture.md has one table row per floor, bottom (1) up: | N | `name`, `name` | ... |"""
    floors = _floors()
    page = (DOCS / "architecture.md").read_text()
    drawn = {}
    for m in re.finditer(r"^\|\s*(\d+)\s*\|([^|\n]*)\|", page, re.M):
        drawn[int(m.group(1))] = re.findall(r"`([^`]+)`", m.group(2))
    expected = {i + 1: list(names) for i, names in enumerate(floors)}
    rows = "\n".join(f"| {i} | " + ", ".join(f"`{n}`" for n in names) + " | ... |" for i, names in expected.items())
    assert drawn == expected, ("docs/architecture.md's floor table differs from FLOORS in tests/test_architecture.py; "
                               f"its rows should read, bottom up:\n{rows}")


def _anchors(page: Path) -> set[str]:
    """The ids of a page's headings, as Python-Markdown's toc (and, for plain headings, GitHub) makes them."""
    out, fence = set(), False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            text = unicodedata.normalize("NFKD", re.sub(r"[`*]", "", m.group(1))).encode("ascii", "ignore").decode()
            out.add(re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower()))
    return out


def test_the_readme_links_to_docs_pages_that_exist():
    text = README.read_text()
    links = re.findall(r"\]\(\s*(?:\./)?(docs/[^)#\s]*)(?:#([^)\s]*))?\s*\)", text)
    assert links, "README.md links to no docs/ page"
    missing = sorted({page for page, _ in links if not (ROOT / page).is_file()})
    assert not missing, f"README.md links to docs pages that do not exist: {missing}"
    bad = sorted({f"{page}#{anchor}" for page, anchor in links if anchor and anchor not in _anchors(ROOT / page)})
    assert not bad, f"README.md links to headings that do not exist: {bad}"
