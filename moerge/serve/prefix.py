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
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_REUSE = 8  # tokens: a shorter shared start is recomputed (the gather costs more than it saves)


@dataclass
class Entry:
    ids: tuple[int, ...]
    keys: list[torch.Tensor]  # per layer (1, heads, len(ids), head_dim)
    values: list[torch.Tensor]


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

    def lookup(self, route: tuple, ids: list[int]) -> tuple[int, Entry | None]:
        """(tokens of ``ids`` whose keys and values a cached entry of ``route`` holds, that entry); at
        most len(ids) - 1, since the last prompt token's forward pass gives the first output token."""
        best, hit = 0, None
        for (r, _), e in self._entries.items():
            if r == route and e.ids[0] == ids[0]:
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

    def insert(self, route: tuple, ids: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Keep one prompt's keys and values (per layer, (1, heads, len(ids), head_dim)), evicting the
        least recently used entries past the budget."""
        n = len(ids)
        if not self.budget or n > self.budget or n < MIN_REUSE:
            return
        key = (route, tuple(ids))
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = Entry(key[1], keys, values)
        self.tokens += n
        while self.tokens > self.budget:
            _, old = self._entries.popitem(last=False)
            self.tokens -= len(old.ids)

    def __len__(self) -> int:
        return len(self._entries)
