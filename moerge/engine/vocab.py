"""Embedding rows aligned by token string when the inputs' vocabularies differ (mergekit's rules).

Two fine-tunes of one base often grow different vocabularies (``<|im_start|>`` added to one, a
tool-call token to another). Their ``embed_tokens`` / ``lm_head`` rows then mean different tokens at
the same index, so merging them by position mixes unrelated tokens. With ``tokenizer_source`` (or a
``tokenizer:`` block) the output vocabulary is chosen (the base's, a model's, or the union), and
every input's embedding matrix is permuted onto it before the merge: row i holds that input's row
for output token i. A token an input lacks gets a default row, by mergekit's rules:

- a ``tokens:`` entry of the ``tokenizer:`` block decides (a model's row, another token's row, zero;
  ``force`` applies it even to inputs that have the token);
- a token only one input has: that input's row; a token no input has: zeros;
- else the base model's row if the base has it, else the mean of the rows of the inputs that have it.

Without either setting, inputs whose vocabularies differ are refused, never merged by position.
The planning here reads tokenizers only; the rows are permuted tensor by tensor in the executor.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moerge.errors import MoergeError
from moerge.util.progress import quiet_transformers

# tensors whose first axis is the vocabulary (input embeddings and output heads)
EMBED = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|embed_out|lm_head|output|embeddings)\.weight$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "vocab.txt", "special_tokens_map.json")
AVERAGE, ZERO = -2, -3  # default-row kinds besides "row r of input i"


def tokenizer_digest(folder: Path) -> str | None:
    """A hash of a folder's tokenizer files (None when it has none): equal digests, equal vocabularies,
    so most merges never load a tokenizer."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = folder / name
        if p.is_file():
            found = True
            h.update(name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest() if found else None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MoergeError(f"{folder}: its tokenizer does not load ({first}); fix or re-download its tokenizer files") from None


def config_vocab_size(config: dict[str, Any]) -> int | None:
    v = config.get("vocab_size", config.get("text_config", {}).get("vocab_size") if isinstance(config.get("text_config"), dict) else None)
    return v if isinstance(v, int) else None


@dataclass
class TokenRule:
    """A ``tokens:`` entry of the ``tokenizer:`` block, resolved: where a token's default row comes from."""

    kind: str  # "model" (that input's row for this token), "model_token" (an input's row by id or token), "zero"
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class Alignment:
    """The output vocabulary and, per input model, where each output token's row comes from."""

    names: set[str]  # embedding tensor names (the same in every input)
    vocab: dict[str, int]  # output token -> id
    rows: int  # output rows (len(vocab), padded to pad_to_multiple_of)
    perms: dict[int, torch.Tensor]  # model index -> LongTensor [len(vocab)]: source row, or -1
    base: int | None  # model index of the base, whose row is the default for shared tokens
    rules: dict[int, TokenRule] = field(default_factory=dict)  # output id -> rule from the tokenizer block
    tokenizer: Any = None  # the output tokenizer when it is built (union, added tokens), else None
    original_vocabs: dict[int, dict[str, int]] = field(default_factory=dict)
    model_index: dict[str, int] = field(default_factory=dict)  # model ref -> index (for rules)

    def apply(self, name: str, tensors: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Each input's matrix permuted onto the output vocabulary (``tensors``: model index -> matrix)."""
        n = len(self.vocab)
        models = list(tensors)
        hidden = {t.shape[1] for t in tensors.values()}
        if len(hidden) > 1:
            raise MoergeError(f"tensor {name}: embedding widths {sorted(hidden)} differ between the inputs; these models "
                              "are not merge-compatible")
        width = hidden.pop()
        default = torch.zeros(n, width, dtype=torch.float32)
        have = {i: self.perms[i] >= 0 for i in models}
        count = torch.stack([have[i] for i in models]).sum(0)
        # tokens with a rule (tokens:), then mergekit's automatic sources
        kind = torch.full((n,), AVERAGE, dtype=torch.long)
        row = torch.full((n,), -1, dtype=torch.long)
        only = count == 1
        for i in models:
            sel = only & have[i]
            kind[sel], row[sel] = i, self.perms[i][sel]
        kind[count == 0] = ZERO
        if self.base is not None and self.base in tensors:
            sel = (count > 1) & have[self.base]
            kind[sel], row[sel] = self.base, self.perms[self.base][sel]
        forced = torch.zeros(n, dtype=torch.bool)
        for tid, rule in self.rules.items():
            k, r = self._rule_source(rule, tid, name)
            kind[tid], row[tid], forced[tid] = k, r, rule.force
        avg = kind == AVERAGE
        if bool(avg.any()):
            total = torch.zeros(int(avg.sum()), width, dtype=torch.float32)
            for i in models:
                sel = have[i][avg]
                total[sel] += tensors[i][self.perms[i][avg][sel]].float()
            default[avg] = total / count[avg].unsqueeze(1)
        for i in models:
            sel = kind == i
            if bool(sel.any()):
                if i not in tensors:
                    raise MoergeError(f"tensor {name}: tokenizer.tokens names a model that is not an input of this tensor")
                default[sel] = tensors[i][row[sel]].float()
        out = {}
        for i, t in tensors.items():
            m = torch.empty(self.rows, width, dtype=t.dtype)
            own = have[i] & ~forced
            m[:n][own] = t[self.perms[i][own]]
            m[:n][~own] = default[~own].to(t.dtype)
            if self.rows > n:  # padding rows: the mean embedding (as mergekit, after Hewitt's vocabulary expansion note)
                m[n:] = m[:n].float().mean(0).to(t.dtype)
            out[i] = m
        return out

    def _rule_source(self, rule: TokenRule, tid: int, name: str) -> tuple[int, int]:
        if rule.kind == "zero":
            return ZERO, -1
        i = self.model_index.get(rule.model or "")
        if i is None:
            raise MoergeError(f"tokenizer.tokens: model {rule.model!r} is not one of the merge's models")
        if rule.kind == "model":
            r = int(self.perms[i][tid])
            if r < 0:
                token = next(t for t, k in self.vocab.items() if k == tid)
                raise MoergeError(f"tokenizer.tokens.{token}: {rule.model} has no token {token!r}; name another source")
            return i, r
        vocab = self.original_vocabs[i]
        r = rule.token_id if rule.token_id is not None else vocab.get(rule.token or "", -1)
        if r is None or r < 0:
            raise MoergeError(f"tokenizer.tokens: {rule.model} has no token {rule.token!r}; name a token it has")
        return i, r


def parse_tokenizer_block(block: Any, where: str = "tokenizer") -> tuple[str, dict[str, TokenRule], int | None]:
    """mergekit's ``tokenizer:`` block -> (source, rules by token, pad_to_multiple_of)."""
    if not isinstance(block, dict):
        raise MoergeError(f"{where}: must be a mapping with source, tokens, pad_to_multiple_of")
    unknown = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if unknown:
        raise MoergeError(f"{where}: unknown key {sorted(map(str, unknown))[0]!r}; it takes source, tokens and pad_to_multiple_of")
    source = block.get("source", "union")
    if not isinstance(source, str) or not source.strip():
        raise MoergeError(f"{where}.source: give base, union or a model")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise MoergeError(f"{where}.pad_to_multiple_of: a whole number, 1 or more, got {pad!r}")
    rules: dict[str, TokenRule] = {}
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise MoergeError(f"{where}.tokens: a mapping of token -> {{source, force}}")
    for tok, cfg in tokens.items():
        at = f"{where}.tokens.{tok}"
        cfg = cfg or {}
        if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
            raise MoergeError(f"{at}: give source: (a model, {{kind: zero}} or {{kind: model_token, model, token | token_id}}) "
                              "and optionally force: true")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise MoergeError(f"{at}.force: true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:
            rules[str(tok)] = TokenRule("auto", force=force)
        elif isinstance(src, str):
            rules[str(tok)] = TokenRule("model", model=src, force=force)
        elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
            rules[str(tok)] = TokenRule("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token" and isinstance(src.get("model"), str) and \
                set(src) <= {"kind", "model", "token", "token_id"} and (("token" in src) != ("token_id" in src)):
            tid = src.get("token_id")
            if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
                raise MoergeError(f"{at}.source.token_id: a token id, 0 or more, got {tid!r}")
            rules[str(tok)] = TokenRule("model_token", model=src["model"], token_id=tid,
                                        token=str(src["token"]) if "token" in src else None, force=force)
        else:
            raise MoergeError(f"{at}.source: a model, {{kind: zero}} or {{kind: model_token, model: M, token: T}} "
                              "(or token_id: N instead of token)")
    return source, rules, pad


def union_tokenizer(base_tok, others: list):
    """The base's tokenizer plus every token the others add (plain tokens first, then added tokens),
    as mergekit builds ``tokenizer_source: union``."""
    import copy

    out = copy.deepcopy(base_tok)
    base_vocab = base_tok.get_vocab()
    added: dict[str, Any] = {}
    plain: list[str] = []
    for tok in [base_tok] + others:
        specials = {info.content: info for info in tok.added_tokens_decoder.values()}
        for t in tok.get_vocab():
            if t in specials:
                added.setdefault(t, specials[t])
            elif t not in base_vocab and t not in plain:
                plain.append(t)
    if plain:
        out.add_tokens(plain)
    new_added = [info for t, info in added.items() if t not in out.get_vocab()]
    if new_added:
        out.add_tokens(new_added)
    return out


def plan_alignment(planner) -> Alignment | None:
    """Decide the output vocabulary for a plan and how each input's embedding rows map onto it, or
    None when the inputs share one vocabulary (and no tokenizer setting asks for another)."""
    r = planner.recipe
    if isinstance(r.tokenizer, dict):
        source, rules, pad = parse_tokenizer_block(r.tokenizer)
    else:
        source, rules, pad = r.tokenizer_source, {}, None
    refs = r.model_refs()
    for ref in refs:
        planner.model(ref)
    models = [planner.m(i) for i in range(len(planner.order))]
    first_ref = r.base_model or (r.models[0].model if r.models else r.slices[0].sources[0].model)
    ref_i = planner.order.index(first_ref)
    tok_only = {source} if source not in (None, "base", "union") and source not in _input_refs(r) else set()
    inputs = [i for i, m in enumerate(models) if m.ref not in tok_only]
    digests = {i: tokenizer_digest(models[i].folder) if models[i].folder.is_dir() else None for i in inputs}
    loaded: dict[Path, Any] = {}

    def tokenizer_of(folder: Path):  # each folder's tokenizer loaded once
        if folder not in loaded:
            loaded[folder] = load_tokenizer(folder)
        return loaded[folder]

    reference = models[ref_i]
    names = _embedding_names(reference)
    if source is None:
        known = {d for d in digests.values() if d}
        if len(known) <= 1:
            return None  # one tokenizer (or none to compare): rows are checked by shape as every tensor is
        vocabs = {i: tokenizer_of(models[i].folder).get_vocab() for i in inputs if digests[i]}
        first = next(iter(vocabs))
        for i, v in vocabs.items():
            if v != vocabs[first]:
                raise MoergeError(_differ(models[first], vocabs[first], models[i], v))
        return None
    # the output tokenizer
    base_ref = r.base_model or first_ref
    if source == "union":
        base_tok = tokenizer_of(planner.m(planner.order.index(base_ref)).folder)
        others = [tokenizer_of(models[i].folder) for i in inputs if digests[i] and models[i].ref != base_ref]
        out_tok = union_tokenizer(base_tok, others)
        built = True
    else:
        src_ref = base_ref if source == "base" else source
        src_model = planner.m(planner.model(src_ref))
        if tokenizer_digest(src_model.folder) is None:
            raise MoergeError(f"tokenizer_source: {src_ref} has no tokenizer files to take the vocabulary from")
        out_tok = load_tokenizer(src_model.folder)  # a fresh copy: tokens may be added to it below
        built = False
    new = [t for t in rules if t not in out_tok.get_vocab()]
    if new:  # tokens named in tokenizer.tokens join the output vocabulary, as in mergekit
        out_tok.add_tokens(new)
        built = True
    vocab = out_tok.get_vocab()
    n = len(vocab)
    rows = -(-n // pad) * pad if pad else n
    # each input's vocabulary: its tokenizer's, or the base's when it ships none (mergekit's assumption)
    original: dict[int, dict[str, int]] = {}
    for i in inputs:
        if digests[i]:
            original[i] = tokenizer_of(models[i].folder).get_vocab()
    fallback_i = planner.order.index(base_ref) if planner.order.index(base_ref) in original else (next(iter(original), None))
    if fallback_i is None:
        raise MoergeError("tokenizer_source: none of the inputs has tokenizer files; embeddings cannot be aligned by token")
    base_vocab = original[fallback_i]
    perms: dict[int, torch.Tensor] = {}
    for i in inputs:
        v = original.get(i, base_vocab)
        original.setdefault(i, v)
        size = _rows(models[i], names)
        perm = torch.full((n,), -1, dtype=torch.long)
        for tok, k in vocab.items():
            j = v.get(tok)
            if j is not None and j < size:
                perm[k] = j
        perms[i] = perm
    base_i = planner.order.index(r.base_model) if r.base_model else None
    by_id = {}
    for tok, rule in rules.items():
        by_id[vocab[tok]] = rule
    return Alignment(names, vocab, rows, perms, base_i, by_id, out_tok if built else None, original,
                     {m.ref: i for i, m in enumerate(models)})


def _input_refs(r) -> set[str]:
    refs = {m.model for m in r.models or []} | {src.model for s in r.slices or [] for src in s.sources}
    if r.base_model:
        refs.add(r.base_model)
    return refs


def _embedding_names(model) -> set[str]:
    """The vocabulary-indexed tensors: embeddings and output heads (2-D, first axis = vocab_size)."""
    size = config_vocab_size(model.config)
    names = set()
    for n in model.source.names():
        info = model.source.info(n)
        if EMBED.search(n) and len(info.shape) == 2 and (size is None or info.shape[0] == size):
            names.add(n)
    return names


def _rows(model, names: set[str]) -> int:
    shapes = {model.source.info(n).shape[0] for n in names if n in model.source}
    return max(shapes) if shapes else 0


def _differ(a, va: dict[str, int], b, vb: dict[str, int]) -> str:
    """One line saying how two vocabularies differ, with a token that shows it."""
    for tok, k in sorted(va.items(), key=lambda x: x[1]):
        if vb.get(tok) != k:
            where = f"id {vb[tok]}" if tok in vb else "missing"
            example = f"token {tok!r} is id {k} in {a.ref} but {where} in {b.ref}"
            break
    else:
        tok = next(t for t in vb if t not in va)
        example = f"token {tok!r} is id {vb[tok]} in {b.ref} but missing in {a.ref}"
    return (f"the inputs' vocabularies differ ({example}), so their embedding rows mean different tokens; add "
            "tokenizer_source: base (or union, or a model) to align them by token, as mergekit does")
