"""The floor plan, checked: which part of moerge may import which.

Every module sits on a floor; a module imports only modules on floors below its own, or in its own
package. The plan is written once, here (``FLOORS``), bottom up, and drawn on the docs' architecture
page (tests/test_docs.py checks the two agree). One package lives on another package's floor
(``PLACED``): ``moe`` is the merge engine's wing (the engine hands it MoE configs; it builds on the
engine's plan and writer).
Imports are read from the source (module level and inside functions alike), so an import hidden in
a function to dodge a circle still counts. The only circle allowed is a registry loading the
plug-ins of its own folder (``routing.registry`` and ``routing.routers.*``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "moerge"

# bottom up: each floor's packages or modules (dotted names under moerge)
FLOORS = [
    ["errors", "version"],
    ["util"],
    ["io"],
    ["lm"],
    ["experts"],
    ["methods", "tasks"],
    ["library"],
    ["engine", "moe"],
    ["train", "eval"],
    ["routing"],
    ["fusion", "vcs", "search", "serve"],
    ["api"],
    ["demo"],
    ["cli"],
    ["__init__"],  # moerge/__init__.py: re-exports the API, imports nothing heavy
]
# modules and packages not yet in the room the plan gives them: where they count now
PLACED = {"moe": "engine"}

def room(module: str) -> str:
    """The floor entry a module belongs to: PLACED's for it or its package, else its package."""
    rel = module.removeprefix("moerge.")
    top = rel.split(".")[0]
    return PLACED.get(rel, PLACED.get(top, top))


def floor(module: str) -> int:
    r = room(module)
    for i, names in enumerate(FLOORS):
        if r in names:
            return i
    raise AssertionError(f"{module}: not on any floor; add its package to FLOORS")


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__") if name != "moerge.__init__" else "moerge.__init__"] = path
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the moerge modules it imports (``from moerge.x import y``: moerge.x.y if that is a module)."""
    graph = {}
    for name, path in mods.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("moerge")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("moerge"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in mods else node.module)
        graph[name] = {m if m in mods else "moerge.__init__" if m == "moerge" else m for m in found} - {name}
    return graph


def name_of(module: str) -> str:
    return "moerge" if module == "moerge.__init__" else module


def ups(graph: dict[str, set[str]]) -> set[str]:
    """Imports of a module on the same floor in another package, or on a higher floor."""
    out = set()
    for a, targets in graph.items():
        for b in targets:
            if b not in graph or room(a) == room(b):
                continue
            if floor(b) >= floor(a):
                out.add(f"{name_of(a)} -> {name_of(b)}")
    return out


def circles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected sets of two or more modules (Tarjan), each sorted; a registry and the
    plug-ins of its own folder (``routing.registry`` loading ``routing.routers.*``) do not count."""
    index, low, stack, on, out = {}, {}, [], set(), set()
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 and not _registry_and_plugins(comp):
                out.add(tuple(sorted(name_of(c) for c in comp)))

    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _registry_and_plugins(comp: list[str]) -> bool:
    regs = [c for c in comp if c.endswith(".registry")]
    if len(regs) != 1:
        return False
    home = regs[0].rsplit(".", 1)[0]
    return all(c == regs[0] or c.startswith(home + ".") for c in comp)


def test_every_module_is_on_a_floor():
    for name in modules():
        floor(name)


def test_no_import_goes_up_a_floor():
    found = sorted(ups(imports(modules())))
    assert not found, "imports up (or across) a floor; import from below, or move the code:\n" + "\n".join(found)


def test_no_import_circle():
    found = sorted(circles(imports(modules())))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checker_sees_a_circle_and_an_upward_import():
    graph = {"moerge.io.a": {"moerge.serve.b"}, "moerge.serve.b": {"moerge.io.a"}, "moerge.routing.registry":
             {"moerge.routing.routers.x"}, "moerge.routing.routers.x": {"moerge.routing.registry"}}
    assert circles(graph) == {("moerge.io.a", "moerge.serve.b")}
    assert ups(graph) == {"moerge.io.a -> moerge.serve.b"}


# what must import without torch (start-up time): the command and the API's front, the git filters and
# the object store they use, the catalogue of real bases, the task readers, the server's request schema
LIGHT = ["moerge", "moerge.api", "moerge.cli", "moerge.engine.run", "moerge.vcs.process", "moerge.vcs.filter",
         "moerge.vcs.diff", "moerge.vcs.remote", "moerge.io.blobs", "moerge.io.hub", "moerge.lm.zoo", "moerge.tasks",
         "moerge.serve.protocol"]


def test_the_light_modules_load_no_torch_and_the_package_re_exports_the_api():
    """``import moerge`` and ``moerge --help`` stay fast, git's filters start without torch; the
    package's names are the API's, loaded on first use."""
    import subprocess
    import sys

    code = (f"import sys, importlib; [importlib.import_module(m) for m in {LIGHT!r}]; "
            "heavy = sorted({'torch', 'transformers', 'fastapi'} & set(sys.modules)); assert not heavy, heavy; "
            "import moerge; assert set(moerge.API) == set(moerge.api.__all__); "
            "assert all(getattr(moerge, n) is getattr(moerge.api, n) for n in moerge.API)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
