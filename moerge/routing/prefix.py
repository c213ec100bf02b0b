"""Prefix caching: the KV cache of prompts already prefilled, reused for the start that a new prompt
shares with one of them.

Chat requests share a long start: the chat template's system prompt and role markers, and often a
task's instruction. A decoder's key and value at position j depend only on tokens 0..j (causal
attention), so the cached keys and values of a prompt P serve any prompt Q for their common prefix,
cut to its length, and only Q's remaining tokens need a forward pass. With experts the keys and
values also depend on the weights that computed them: an entry is stored under its route key (the
expert weights of a row with fixed weights, or the token router's name, whose per-token weights are
causal too) and serves only rows with the same key. vLLM's automatic prefix caching keys blocks by
LoRA id for the same reason.

Entries are whole prompts (one row's keys and values per layer), kept least recently used first
within a budget of cached tokens; lookup scans the entries of a route for the longest common prefix.
Anything that changes the weights (an adapter loaded or unloaded, a router refitted) clears the cache.

Task-level routers that embed a prompt with the base (``Mixture.embed``: the mean of the base's final
hidden states) run one more forward pass over every prompt; its entries (the base's route) also keep
each position's final hidden state, so that a prompt's embedding computes only what it does not share.
The server's prefill and those embeddings both go through ``forward``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from moerge.lm.device import model_device, to_device
from moerge.lm.generate import left_pad

MIN_REUSE = 8  # tokens: a shorter shared start is recomputed (the gather costs more than it saves)
MIN_NEW = 8  # a prompt is kept when at least this many of its tokens were computed (not reused)


BASE = ()  # the route key of the base alone (no expert weights)


@dataclass
class Entry:
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer (1, heads, len(ids), head_dim)
    values: list[torch.Tensor]
    hidden: torch.Tensor | None = None  # (len(ids), hidden) the base's final hidden states, float32 (embeddings)


def common_prefix(a: tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """At most ``budget`` cached prompt tokens over all routes (0: off)."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()  # (route key, ids) -> entry, oldest use first
        self.tokens = 0
        self.stats = {"prompt_tokens": 0, "reused_tokens": 0}

    def __bool__(self) -> bool:
        return self.budget > 0

    def clear(self) -> None:
        self._entries.clear()
        self.tokens = 0

    def lookup(self, route: tuple, ids: list[int], hidden: bool = False) -> tuple[int, Entry | None]:
        """(tokens of ``ids`` whose keys and values a cached entry of ``route`` holds, that entry); at
        most len(ids) - 1, since the last prompt token's forward pass gives the first output token.
        ``hidden``: only entries that also hold final hidden states."""
        best, hit = 0, None
        for (r, _), e in self._entries.items():
            if r == route and e.ids[0] == ids[0] and (e.hidden is not None or not hidden):
                n = common_prefix(e.ids, ids)
                if n > best:
                    best, hit = n, e
        best = min(best, len(ids) - 1)
        self.stats["prompt_tokens"] += len(ids)
        if best < MIN_REUSE:
            return 0, None
        self._entries.move_to_end((route, hit.ids))
        self.stats["reused_tokens"] += best
        return best, hit

    def insert(self, route: tuple, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor],
               hidden: torch.Tensor | None = None) -> None:
        """Keep one prompt's keys and values (per layer, (1, heads, len(ids), head_dim)), and its final
        hidden states if given, evicting the least recently used entries past the budget."""
        n = len(ids)
        if not self.budget or n > self.budget or n < MIN_REUSE:
            return
        key = (route, tuple(ids))
        if key in self._entries:
            if hidden is not None and self._entries[key].hidden is None:
                self._entries[key].hidden = hidden
            self._entries.move_to_end(key)
            return
        self._entries[key] = Entry(key[1], keys, values, hidden)
        self.tokens += n
        while self.tokens > self.budget:
            _, old = self._entries.popitem(last=False)
            self.tokens -= len(old.ids)

    def __len__(self) -> int:
        return len(self._entries)


def cache_argument(model) -> str:
    """The name of ``model.forward``'s KV cache argument: ``cache`` in transformers 5, else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits_only(model) -> dict:
    """The keyword that makes ``model`` compute logits for the last position only ({} if it has none)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return next(({k: 1} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})


def embed(model, prefixes: PrefixCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, pad: int) -> torch.Tensor:
    """Mean-pooled final hidden states of the base (``experts.embed.mean_pooled``'s embeddings), each
    prompt's start shared with a cached base prompt taken from the cache (its keys and values, and its
    final hidden states); the prompts are kept for the next ones. (b, hidden) float32."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    reuse = [prefixes.lookup(BASE, r, hidden=True) for r in rows]
    out, cache, mask, width = forward(model, rows, reuse, pad, cache_argument(model), output_hidden_states=True,
                                      **last_logits_only(model))
    h = out.hidden_states[-1].float()
    live = mask[:, width:].bool()
    states = [torch.cat([e.hidden[:n], h[i][live[i]]]) if n else h[i][live[i]] for i, (n, e) in enumerate(reuse)]
    keep(prefixes, cache, mask, rows, [BASE] * len(rows), reuse, states)
    return torch.stack([s.mean(0) for s in states])


def forward(model, rows: list[list[int]], reuse: list[tuple[int, Entry | None]], pad: int, cache_kw: str, **kw):
    """One left-padded forward pass over ``rows`` (token id lists) in a new ``DynamicCache``, each row's
    first n tokens taken from its ``reuse`` entry (n, entry) instead of computed: the cache holds
    [zeros | the entry's first n columns] per row, the input [padding | the row's other tokens];
    positions come from the mask. Returns (output, cache, mask over all columns, width of the reused
    part); the output covers the computed columns only."""
    from transformers import DynamicCache

    cache = DynamicCache()
    width = max((n for n, _ in reuse), default=0)
    if width:
        _fill(cache, reuse, width)
        ids, new_mask = left_pad([r[n:] for r, (n, _) in zip(rows, reuse)], pad)
        cached = torch.tensor([[0] * (width - n) + [1] * n for n, _ in reuse])
        mask = torch.cat([cached, new_mask], 1)
    else:
        ids, mask = left_pad(rows, pad)
    ids, mask = to_device({"ids": ids, "mask": mask}, model_device(model)).values()  # made on the CPU, once per prefill
    pos = (mask.cumsum(1) - 1).clamp(min=0)[:, width:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: cache}, **kw)
    return out, cache, mask, width


def keep(prefixes: PrefixCache, cache, mask: torch.Tensor, rows: list[list[int]], routes: list[tuple],
         reuse: list[tuple[int, Entry | None]], hidden: list[torch.Tensor] | None = None) -> None:
    """Store the rows whose tokens were mostly computed now (per layer, the row's live columns), with
    their final hidden states if given. A model whose cache is not plain (sliding windows and the like:
    its columns are not one per token) turns the prefix cache off."""
    if any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        prefixes.budget = 0
        prefixes.clear()
        return
    for i, (ids, route) in enumerate(zip(rows, routes)):
        n = reuse[i][0] if reuse else 0
        if len(ids) - n < MIN_NEW:
            continue
        cols = mask[i].nonzero().flatten()
        prefixes.insert(route, ids, [layer.keys[i:i + 1, :, cols] for layer in cache.layers],
                        [layer.values[i:i + 1, :, cols] for layer in cache.layers],
                        None if hidden is None else hidden[i])


def _fill(cache, reuse: list[tuple[int, Entry | None]], width: int) -> None:
    """Put each row's reused prefix, left-padded with zeros to ``width`` columns, in ``cache``."""
    some = next(e for n, e in reuse if n)
    for layer in range(len(some.keys)):
        kv = []
        for kind in ("keys", "values"):
            like = getattr(some, kind)[layer]
            kv.append(torch.cat([pad_left(getattr(e, kind)[layer][:, :, :n] if n else like[:, :, :0], width)
                                 for n, e in reuse], 0))
        cache.update(*kv, layer)


def pad_left(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros before its entries along ``dim`` up to ``width`` (a KV cache's columns: dim 2)."""
    extra = width - t.shape[dim]
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim)
