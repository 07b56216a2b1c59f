"""Caches of recent conversations, kept for the next request that continues one
(the server's prompt-cache reuse, as mlx_lm.server and llama-server do).

An entry is a cache of one policy and parameters with the tokens it holds. A
request takes the entry whose tokens are the longest prefix of its prompt: the
rest of the prompt is all it reads. A cache that can forget tokens exactly
(full, RefreshKV: policies.trimmable) is also reused when the prompt parts from
it midway, trimmed back to where they agree; any other is reused only on an
exact prefix. Entries are kept least-recently-used first out, bounded in bytes.
A taken entry leaves the store (two requests never share a cache); the
request's cache goes back in when it ends.
"""

import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

from mlx_kvcache.policies import trimmable


@dataclass
class Entry:
    key: str  # the policy and its parameters
    tokens: List[int]  # what the cache holds, in order
    cache: list

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


class PromptCacheStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: List[Entry] = []  # least recently used first
        self.lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def take(self, key: str, prompt: List[int]) -> Tuple[Optional[list], int]:
        """(a cache holding prompt[:n], n), or (None, 0). At least one prompt
        token is always left to read (the step that yields the first token)."""
        with self.lock:
            best, best_n = None, 0
            for entry in self.entries:
                if entry.key != key:
                    continue
                n = common_prefix(entry.tokens, prompt)
                n = min(n, len(prompt) - 1)
                exact = n == len(entry.tokens)
                if n > best_n and (exact or trimmable(entry.cache)):
                    best, best_n = entry, n
            if best is None:
                return None, 0
            self.entries.remove(best)
        if best_n < len(best.tokens):
            for layer in best.cache:
                layer.trim(layer.offset - best_n)
        return best.cache, best_n

    def put(self, key: str, tokens: List[int], cache: list) -> None:
        """Keep `cache` (holding `tokens`), evicting the oldest past the bound."""
        entry = Entry(key, list(tokens), cache)
        if entry.nbytes > self.max_bytes:
            return
        with self.lock:
            self.entries.append(entry)
            while self.nbytes > self.max_bytes:
                self.entries.pop(0)


def common_prefix(a: List[int], b: List[int]) -> int:
    """How many first tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
