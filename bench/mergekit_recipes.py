"""How many of mergekit's own recipes does moerge accept unchanged?

Collects every merge recipe mergekit ships (examples/*.yml, the YAML blocks of README.md and docs/*.md,
and the MergeConfiguration objects its tests build), maps every model id in each to a tiny local Llama
(one base built with ``moerge.lm.tiny``, distinct ids -> distinct fine-tunes of it; enough layers for every
``layer_range``; a tokenizer holding every token the recipes name), and runs ``moerge.plan`` (a dry run)
on each. Where mergekit is installed (``--mergekit-bin``, default /tmp/mk/bin), it also runs mergekit on
the same mapped recipe, so the table separates "mergekit refuses it as well" from real gaps.

    python bench/mergekit_recipes.py --mergekit-src /work/.mirror/arcee-ai+mergekit/repo
    python bench/mergekit_recipes.py RECIPE_FOLDER          # your own *.yml / *.yaml files

mergekit's files are read at run time (from a git mirror or checkout, or a pip-installed mergekit's
package data), never copied into this repository. mergekit-moe configs are planned too (and run
with mergekit-moe); mergekit-evolve configs are counted and skipped.
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import os
import re
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

MIRROR = "/work/.mirror/arcee-ai+mergekit/repo"


# ---------------------------------------------------------------------------------- collecting
class Source:
    """mergekit's files: a git directory (read at HEAD), a checkout, or an installed package."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.git = (self.path / "HEAD").is_file() and (self.path / "objects").is_dir()

    def names(self) -> list[str]:
        if self.git:
            out = subprocess.run(["git", "-C", str(self.path), "ls-tree", "-r", "--name-only", "HEAD"],
                                 capture_output=True, text=True, check=True).stdout
            return out.split()
        return [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]

    def read(self, name: str) -> str:
        if self.git:
            return subprocess.run(["git", "-C", str(self.path), "show", f"HEAD:{name}"],
                                  capture_output=True, text=True, check=True).stdout
        return (self.path / name).read_text()


def installed_source() -> Source | None:
    """A pip-installed mergekit's folder, if it carries examples (wheels usually do not)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("mergekit")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    for root in (Path(spec.origin).parent, Path(spec.origin).parent.parent):
        if (root / "examples").is_dir():
            return Source(str(root))
    return None


def yaml_blocks(md: str) -> list[str]:
    blocks, cur = [], None
    for line in md.splitlines():
        if line.strip().startswith("```"):
            if cur is not None:
                blocks.append("\n".join(cur) + "\n")
                cur = None
            elif line.strip().lstrip("`").strip().lower() in ("yaml", "yml"):
                cur = []
            continue
        if cur is not None:
            cur.append(line)
    return blocks


def collect(src: Source) -> list[dict]:
    """Every recipe: {name, text, kind}; kind is recipe, fragment, placeholder, moe or evolve."""
    out = []
    names = src.names()
    for n in sorted(names):
        if n.startswith("examples/") and n.endswith((".yml", ".yaml")):
            out.append({"name": n, "text": src.read(n), "kind": "recipe"})
    for n in ["README.md"] + sorted(x for x in names if x.startswith("docs/") and x.endswith(".md")):
        if n not in names:
            continue
        for i, text in enumerate(yaml_blocks(src.read(n))):
            name = f"{n}#{i + 1}"
            if re.search(r"^\s*\.\.\.\s*$", text, re.M):
                kind = "placeholder"  # `...` standing for omitted keys
            elif n.endswith("moe.md") or re.search(r"^\s*(experts|shared_experts|gate_mode):", text, re.M):
                kind = "moe"
            elif n.endswith("evolve.md") or re.search(r"^\s*genome:", text, re.M):
                kind = "evolve"
            elif "merge_method" not in text:
                kind = "fragment"
            else:
                kind = "recipe"
            out.append({"name": name, "text": text, "kind": kind})
    for n in sorted(x for x in names if x.startswith("tests/") and x.endswith(".py")):
        text = src.read(n)
        if "MergeConfiguration" not in text and "merge_method" not in text:
            continue
        for name, cfg, expect in TestConfigs(text).run():
            out.append({"name": f"{n}::{name}", "text": yaml.safe_dump(cfg, sort_keys=False), "kind": "recipe",
                        "expect": expect})
    return out


class TestConfigs:
    """The MergeConfigurations a mergekit test file builds, by interpreting the test functions' AST
    (fixtures become their names as model ids; loops are unrolled; helper methods are followed)."""

    CTORS = {"MergeConfiguration", "InputModelDefinition", "InputSliceDefinition", "OutputSliceDefinition",
             "TokenizerConfig", "ParameterSetting"}

    def __init__(self, text: str):
        self.tree = ast.parse(text)
        self.found: list[tuple[str, dict, str]] = []

    def run(self):
        for node in self.tree.body:
            if isinstance(node, ast.ClassDef):
                methods = {f.name: f for f in node.body if isinstance(f, ast.FunctionDef)}
                for f in methods.values():
                    if f.name.startswith("test"):
                        self._test(f"{node.name}::{f.name}", f, methods)
            elif isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                self._test(node.name, node, {})
        return self.found

    def _test(self, name, f, methods):
        self.methods = methods
        self.name, self.count, self.expect, self._loops = name, 0, "accept", False
        env = {a.arg: a.arg for a in f.args.args if a.arg != "self"}
        try:
            self._exec(f.body, env)
        except _Return:
            pass
        except Exception:  # a construct this little interpreter does not follow: skip the rest
            pass

    def _emit(self, cfg):
        if isinstance(cfg, dict) and "merge_method" in cfg:
            self.count += 1
            clean = _drop_none(copy.deepcopy(cfg))
            suffix = f"#{self.count}" if self.count > 1 or self._loops else ""
            self.found.append((self.name + suffix, clean, self.expect))

    _loops = False

    def _exec(self, body, env):
        for st in body:
            try:
                self._stmt(st, env)
            except _Return:
                raise
            except Exception:  # noqa: BLE001 - a construct not followed (arithmetic for a check ...): go on
                pass

    def _stmt(self, st, env):
        if True:
            if isinstance(st, ast.Assign):
                val = self._eval(st.value, env)
                for tgt in st.targets:
                    self._assign(tgt, val, env)
            elif isinstance(st, ast.Expr):
                self._eval(st.value, env)
            elif isinstance(st, ast.For):
                self._loops = True
                for v in self._eval(st.iter, env):
                    self._assign(st.target, v, env)
                    self._exec(st.body, env)
            elif isinstance(st, ast.With):
                old = self.expect
                if any("raises" in ast.unparse(w.context_expr) for w in st.items):
                    self.expect = "reject"
                self._exec(st.body, env)
                self.expect = old
            elif isinstance(st, ast.Return):
                raise _Return(self._eval(st.value, env) if st.value else None)
            # function defs (validators), asserts, prints: ignored

    def _assign(self, tgt, val, env):
        if isinstance(tgt, ast.Name):
            env[tgt.id] = val
        elif isinstance(tgt, ast.Attribute):
            self._eval(tgt.value, env)[tgt.attr] = val
        elif isinstance(tgt, ast.Subscript):
            self._eval(tgt.value, env)[self._eval(tgt.slice, env)] = val

    def _eval(self, e, env):
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.Name):
            return env.get(e.id, e.id)
        if isinstance(e, (ast.List, ast.Tuple)):
            return [self._eval(x, env) for x in e.elts]
        if isinstance(e, ast.Dict):
            return {self._eval(k, env): self._eval(v, env) for k, v in zip(e.keys, e.values)}
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.USub):
            return -self._eval(e.operand, env)
        if isinstance(e, ast.BinOp):
            a, b = self._eval(e.left, env), self._eval(e.right, env)
            if isinstance(e.op, ast.Mult):
                return [copy.deepcopy(x) for x in a for _ in range(1)] * b if isinstance(a, list) else a * b
            if isinstance(e.op, ast.Add):
                return a + b
            raise ValueError
        if isinstance(e, ast.ListComp) and len(e.generators) == 1:
            g = e.generators[0]
            out = []
            for v in self._eval(g.iter, env):
                inner = dict(env)
                self._assign(g.target, v, inner)
                out.append(self._eval(e.elt, inner))
            return out
        if isinstance(e, ast.Attribute):
            base = self._eval(e.value, env)
            return base.get(e.attr) if isinstance(base, dict) else None
        if isinstance(e, ast.Subscript):
            return self._eval(e.value, env)[self._eval(e.slice, env)]
        if isinstance(e, ast.IfExp):
            return self._eval(e.body if self._eval(e.test, env) else e.orelse, env)
        if isinstance(e, ast.Compare) and len(e.ops) == 1:
            a, b = self._eval(e.left, env), self._eval(e.comparators[0], env)
            op = e.ops[0]
            return (a is not b) if isinstance(op, ast.IsNot) else (a is b) if isinstance(op, ast.Is) else a == b
        if isinstance(e, ast.Call):
            fn = e.func
            fname = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
            args = [self._eval(a, env) for a in e.args]
            kwargs = {k.arg: self._eval(k.value, env) for k in e.keywords if k.arg}
            if fname in self.CTORS:
                return dict(kwargs)
            if fname == "run_and_check_merge" and args:
                self._emit(args[0])
                return None
            if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id == "self" \
                    and fname in self.methods:
                return self._call(self.methods[fname], args, kwargs)
            return None
        return None

    def _call(self, f, args, kwargs):
        params = [a.arg for a in f.args.args][1:]
        defaults = f.args.defaults
        env = dict(zip(params[len(params) - len(defaults):], [self._eval(d, {}) for d in defaults]))
        env.update(zip(params, args))
        env.update(kwargs)
        try:
            self._exec(f.body, env)
        except _Return as r:
            return r.value
        return None


class _Return(Exception):
    def __init__(self, value):
        self.value = value


def _drop_none(x):
    if isinstance(x, dict):
        return {k: _drop_none(v) for k, v in x.items() if v is not None and v != {} or k == "parameters" and v == {}}
    if isinstance(x, list):
        return [_drop_none(v) for v in x]
    return x


# ---------------------------------------------------------------------------------- mapping
SKELETON = {"merge_method": "linear", "base_model": "base",
            "models": [{"model": "base", "parameters": {"weight": 1.0}}, {"model": "model_a", "parameters": {"weight": 1.0}}]}


def complete(fragment: dict) -> dict:
    doc = copy.deepcopy(SKELETON) | fragment
    for i in model_ids(fragment):
        if i not in [m["model"] for m in doc["models"]]:
            doc["models"].append({"model": i, "parameters": {"weight": 1.0}})
    return doc


# Forms mergekit 0.1.5 accepts that its shipped recipes happen not to use (--variants): value formats its
# pydantic schema coerces, and keys it ignores or has no implementation for.
_TWO = "models:\n  - model: a\n    parameters: {weight: 0.5}\n  - model: b\n    parameters: {weight: 0.5}\n"
_TIES = ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 0.5, density: 0.5}\n"
         "  - model: b\n    parameters: {weight: 0.5, density: 0.5}\n")
VARIANTS = {
    "variant:scientific-notation (PyYAML reads 1e-1 as a string)": _TIES.replace("weight: 0.5, density: 0.5}\n  - model: b",
                                                                                "weight: 1e-1, density: 5e-1}\n  - model: b"),
    "variant:quoted-number": "merge_method: linear\n" + _TWO.replace("weight: 0.5", 'weight: "0.5"'),
    "variant:torch-dtype": "merge_method: linear\n" + _TWO + "dtype: torch.bfloat16\nout_dtype: torch.float16\n",
    "variant:bool-as-1/0": _TIES + "parameters: {normalize: 1, int8_mask: 0}\n",
    "variant:bool-as-string": _TIES + 'parameters: {normalize: "true", int8_mask: "false"}\n',
    "variant:layer_range-strings": "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: ['0', '4']\n",
    "variant:filter-star": "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [{filter: '*', value: 0.3}]}\n"
                           "  - model: b\n    parameters: {weight: 0.7}\n",
    "variant:nulls": "merge_method: linear\n" + _TWO + "dtype: null\ntokenizer_source: null\nchat_template: null\n",
    "variant:slice-base_model": "merge_method: task_arithmetic\nslices:\n  - base_model: base\n    sources:\n"
                                "      - {model: a, layer_range: [0, 4], parameters: {weight: 0.5}}\n      - {model: base, layer_range: [0, 4]}\n",
    "variant:empty-models-beside-slices": "merge_method: passthrough\nmodels: []\nslices:\n  - sources:\n"
                                          "      - {model: a, layer_range: [0, 4]}\n",
    "variant:residual_weight": "merge_method: passthrough\nslices:\n  - residual_weight: 0.5\n    sources:\n"
                               "      - {model: a, layer_range: [0, 4]}\n",
    "variant:unknown-key (mergekit ignores it)": "merge_method: linear\n" + _TWO + "input_model_parameters: {}\n",
}


def documents(text: str) -> list:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def model_ids(doc: dict) -> list[str]:
    ids: list[str] = []

    def add(v):
        if isinstance(v, str):
            ids.append(v)

    add(doc.get("base_model"))
    for e in (doc.get("experts") or []) + (doc.get("shared_experts") or []):  # mergekit-moe configs
        add(e.get("source_model") if isinstance(e, dict) else None)
    for m in doc.get("models") or []:
        add(m.get("model") if isinstance(m, dict) else None)
    for s in doc.get("slices") or []:
        add(s.get("base_model"))
        for src in s.get("sources") or []:
            add(src.get("model"))
    if doc.get("tokenizer_source") not in (None, "base", "union"):
        add(doc["tokenizer_source"])
    tok = doc.get("tokenizer")
    if isinstance(tok, dict):
        if tok.get("source") not in (None, "base", "union"):
            add(tok["source"])
        for cfg in (tok.get("tokens") or {}).values():
            src = (cfg or {}).get("source")
            add(src if isinstance(src, str) else (src or {}).get("model") if isinstance(src, dict) else None)
    return list(dict.fromkeys(i for i in ids if i))


def tokens_named(docs: list) -> set[str]:
    out = set()
    for d in docs:
        tok = d.get("tokenizer") if isinstance(d, dict) else None
        if isinstance(tok, dict):
            for name, cfg in (tok.get("tokens") or {}).items():
                out.add(str(name))
                src = (cfg or {}).get("source")
                if isinstance(src, dict) and isinstance(src.get("token"), str):
                    out.add(src["token"])
    return out


def layers_needed(docs: list) -> int:
    n = 2
    for d in docs:
        for s in (d.get("slices") or []) if isinstance(d, dict) else []:
            for src in s.get("sources") or []:
                lr = src.get("layer_range")
                if isinstance(lr, list) and len(lr) == 2 and isinstance(lr[1], int):
                    n = max(n, lr[1])
    return n


def mapped(docs: list, folders: dict) -> tuple[list, dict]:
    """The documents with every model id replaced by a local folder (stage names kept)."""
    stages = {d.get("name") for d in docs if d.get("name")}
    ids: list[str] = []
    for d in docs:
        ids += [i for i in model_ids(d) if i not in stages and i not in ids]
    bases = [d.get("base_model") for d in docs if isinstance(d.get("base_model"), str)]
    mapping, k = {}, 0
    for i in ids:
        if i in bases and "base" not in mapping.values():
            mapping[i] = "base"
        else:
            mapping[i] = f"ft{k}"
            k += 1
    mapping = {i: folders[v] for i, v in mapping.items()}

    def sub(x, key=None):
        if isinstance(x, dict):
            return {kk: sub(v, kk) for kk, v in x.items()}
        if isinstance(x, list):
            return [sub(v, key) for v in x]
        if isinstance(x, str) and key in ("model", "base_model", "source", "tokenizer_source", "source_model") and x in mapping:
            return mapping[x]
        return x

    return [sub(d) for d in docs], mapping


def build_models(root: Path, layers: int, tokens: set[str], n_ft: int) -> dict:
    from moerge.lm import tiny

    vocab = tiny.SPECIALS + tiny.CHARS + sorted(t for t in tokens if t not in tiny.SPECIALS + tiny.CHARS)
    base = tiny.make_vocab_model(root / "base", vocab, seed=0, hidden=16, layers=layers)
    folders = {"base": str(base)}
    for i in range(n_ft):
        folders[f"ft{i}"] = str(tiny.make_finetune(base, root / f"ft{i}", seed=100 + i))
    return folders


# ---------------------------------------------------------------------------------- running
def run_moerge(path: Path) -> tuple[bool, str]:
    import moerge
    from moerge.errors import MoergeError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            p = moerge.plan(str(path))
        except MoergeError as e:
            return False, str(e).replace(str(path), "recipe").splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a crash is itself a finding
            return False, f"CRASH {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    n = len(getattr(p, "tasks", None) or getattr(p, "stages", None) or [])
    warns = [str(w.message).replace(str(path), "recipe") for w in caught if "moerge" in type(w.message).__module__]
    what = f"{n} tensors" if hasattr(p, "tasks") else f"{n} stages"
    return True, what + (f"; {len(warns)} warning(s): {warns[0][:100]}" if warns else "")


def run_mergekit(bin_dir: Path, path: Path, multi: bool, work: Path, moe: bool = False) -> tuple[bool, str]:
    out = work / (path.stem + ".mkout")
    if moe:
        cmd = [str(bin_dir / "mergekit-moe"), str(path), str(out)]
    elif multi:
        cmd = [str(bin_dir / "mergekit-multi"), str(path), "--out-path", str(out), "-I", str(work / (path.stem + ".mkint"))]
    else:
        cmd = [str(bin_dir / "mergekit-yaml"), str(path), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        r = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    if r.returncode == 0:
        return True, "ok"
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    err = next((ln for ln in reversed(lines) if re.match(r"^[\w.]*(Error|Exception)\b|^\w+Error:", ln)), lines[-1] if lines else "")
    return False, err[:160]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", help="a folder of recipe files (*.yml, *.yaml); default: mergekit's own")
    ap.add_argument("--mergekit-src", default=None, help=f"mergekit's git dir or checkout (default: {MIRROR}, else a pip-installed mergekit)")
    ap.add_argument("--mergekit-bin", default="/tmp/mk/bin", help="folder holding mergekit-yaml; also run mergekit if present")
    ap.add_argument("--no-mergekit", action="store_true", help="do not run mergekit")
    ap.add_argument("--keep", default=None, help="build models and mapped recipes here (kept)")
    ap.add_argument("--variants", action="store_true", help="also try forms mergekit accepts that its recipes do not use")
    ap.add_argument("-j", "--jobs", type=int, default=3, help="mergekit runs in parallel")
    args = ap.parse_args(argv)

    if args.folder:
        recipes = [{"name": p.name, "text": p.read_text(), "kind": "recipe"}
                   for p in sorted(Path(args.folder).iterdir()) if p.suffix in (".yml", ".yaml")]
    else:
        src = Source(args.mergekit_src) if args.mergekit_src else (
            Source(MIRROR) if Path(MIRROR).exists() else installed_source())
        if src is None:
            sys.exit("no mergekit source: give --mergekit-src or a recipe folder")
        recipes = collect(src)

    if args.variants:
        recipes += [{"name": k, "text": v, "kind": "recipe"} for k, v in VARIANTS.items()]
    skipped = [r for r in recipes if r["kind"] in ("evolve", "placeholder")]
    todo = [r for r in recipes if r["kind"] in ("recipe", "fragment", "moe")]
    parsed = []
    for r in todo:
        try:
            docs = documents(r["text"])
        except yaml.YAMLError as e:
            parsed.append((r, None, f"not YAML: {str(e).splitlines()[0]}"))
            continue
        if r["kind"] == "fragment":  # a block of keys: completed as a linear merge of every model it names
            docs = [complete(d) for d in docs]
        parsed.append((r, docs, None))
    all_docs = [d for _, docs, _ in parsed if docs for d in docs]
    layers = max(layers_needed(all_docs), 2)
    n_ft = max(len(model_ids(d)) for d in all_docs) + 2

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mk-recipes-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"building a {layers}-layer tiny Llama base and {n_ft} fine-tunes in {tmp} ...", file=sys.stderr)
    folders = build_models(tmp / "models", layers, tokens_named(all_docs), n_ft)

    mk_bin = Path(args.mergekit_bin)
    use_mk = not args.no_mergekit and (mk_bin / "mergekit-yaml").exists()
    rows, jobs = [], []
    for i, (r, docs, err) in enumerate(parsed):
        if docs is None:
            rows.append([r["name"], r["kind"], False, err, None, ""])
            continue
        docs_m, _ = mapped(docs, folders)
        path = tmp / "recipes" / f"{i:02d}.yml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump_all(docs_m, sort_keys=False))
        ok, msg = run_moerge(path)
        rows.append([r["name"], r["kind"] + (" (mergekit's test expects a refusal)" if r.get("expect") == "reject" else ""),
                     ok, msg, None, ""])
        if use_mk:
            jobs.append((len(rows) - 1, path, len(docs) > 1, r["kind"] == "moe"))
    if use_mk:
        print(f"running mergekit on {len(jobs)} recipes ...", file=sys.stderr)
        with ThreadPoolExecutor(args.jobs) as pool:
            for (row, *_), res in zip(jobs, pool.map(lambda j: run_mergekit(mk_bin, j[1], j[2], tmp / "mk", j[3]), jobs)):
                rows[row][4], rows[row][5] = res

    out = io.StringIO()
    w = max(len(r[0]) for r in rows)
    out.write(f"{'recipe':<{w}}  {'moerge':<8} {'mergekit':<9} message\n")
    for name, kind, ok, msg, mk, mkmsg in rows:
        mkcol = "-" if mk is None else ("accepts" if mk else "refuses")
        note = f"  [{kind}]" if kind != "recipe" else ""
        out.write(f"{name:<{w}}  {'accepted' if ok else 'REFUSED':<8} {mkcol:<9} {msg}{note}\n")
        if mk is False:
            out.write(f"{'':<{w}}  {'':<8} {'':<9} mergekit: {mkmsg}\n")
    for r in skipped:
        out.write(f"{r['name']:<{w}}  skipped  {'':<9} {r['kind']} config\n")
    kinds = {k: sum(1 for r in skipped if r["kind"] == k) for k in ("evolve", "placeholder")}
    shipped = [r for r in rows if not r[0].startswith("variant:") and not r[1].startswith("moe")]
    moes = [r for r in rows if r[1].startswith("moe")]
    out.write(f"\n{len(recipes) - (len(VARIANTS) if args.variants else 0)} blocks/configs found: {len(shipped)} merge recipes tried "
              f"({sum(1 for r in todo if r['kind'] == 'fragment')} fragments completed as a linear merge), {len(moes)} "
              f"mergekit-moe configs tried, skipped {kinds['evolve']} mergekit-evolve, {kinds['placeholder']} placeholder.\n")
    for label, group in (("mergekit's recipes", shipped), ("mergekit-moe configs", moes),
                         ("variants", [r for r in rows if r[0].startswith("variant:")])):
        if not group:
            continue
        acc = sum(1 for r in group if r[2])
        both = sum(1 for r in group if not r[2] and r[4] is False)
        gaps = sum(1 for r in group if not r[2] and r[4] is not False)
        out.write(f"{label}: moerge accepts {acc}/{len(group)}; refused {len(group) - acc}: {both} refused by mergekit too"
                  + ("" if use_mk else " (mergekit not run)") + f", {gaps} gaps"
                  + (f"; mergekit refuses {sum(1 for r in group if r[2] and r[4] is False)} that moerge accepts" if use_mk else "") + "\n")
    print(out.getvalue(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
