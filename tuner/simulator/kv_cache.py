"""Paged KV cache bookkeeping: a block pool with an LRU prefix cache, as vLLM's block manager keeps it.

Blocks are counted, not named: a request holds `private` blocks (only its own KV) plus references to
cached blocks, which are identified by the hash of the whole prompt prefix up to and including them.
A cached block nobody references stays in the cache (reusable) until an allocation needs its room;
then the least recently freed one is evicted first.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

HASH_OFFSET = np.uint64(0x9E3779B97F4A7C15)


class PrefixHasher:
    """Chain hashes of the full blocks of a token-id prompt, in one vectorised pass.

    hash(block i) = sum over positions p < (i+1) x block_size of (token_p + c) x R_p  (mod 2^64), with
    fixed random odd multipliers R_p: it depends on the whole prefix, like vLLM's chained block hash.
    """

    def __init__(self, max_len: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        rng = np.random.default_rng([seed, 0x5EED])
        self._multipliers = rng.integers(1, 2**63, size=max_len, dtype=np.uint64) | np.uint64(1)

    def block_hashes(self, token_ids: np.ndarray) -> list[int]:
        full = min(len(token_ids), len(self._multipliers)) // self.block_size * self.block_size
        if full == 0:
            return []
        ids = token_ids[:full].astype(np.uint64)
        mixed = (ids + HASH_OFFSET) * self._multipliers[:full]
        return np.cumsum(mixed, dtype=np.uint64)[self.block_size - 1::self.block_size].tolist()


class KVCache:
    """Free / cached / evictable block counts and the prefix cache's reference counts."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_free = num_blocks  # blocks holding nothing
        self._refs: dict[int, int] = {}  # cached block hash -> requests referencing it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free - len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (vLLM's kv_cache_usage_perc: reusable cached blocks count as free)."""
        return self.num_used / self.num_blocks

    def match_prefix(self, hashes: list[int], max_blocks: int) -> tuple[int, int]:
        """(leading blocks found in the cache, how many of them are currently unreferenced)."""
        matched = unreferenced = 0
        refs = self._refs
        for block_hash in hashes[:max_blocks]:
            count = refs.get(block_hash)
            if count is None:
                break
            matched += 1
            unreferenced += count == 0
        return matched, unreferenced

    def can_allocate(self, num_new: int, unreferenced_hits: int = 0) -> bool:
        return num_new <= self.num_free + len(self._evictable) - unreferenced_hits

    def acquire(self, hashes: list[int]) -> None:
        """Reference cached blocks (a prefix hit); they stop being evictable."""
        for block_hash in hashes:
            if self._refs[block_hash] == 0:
                del self._evictable[block_hash]
            self._refs[block_hash] += 1

    def allocate(self, num_new: int) -> bool:
        """Take `num_new` empty blocks, evicting least recently used cached blocks if needed."""
        if num_new <= 0:
            return True
        if num_new > self.num_free + len(self._evictable):
            return False
        while self.num_free < num_new:
            block_hash, _ = self._evictable.popitem(last=False)
            del self._refs[block_hash]
            self.num_free += 1
        self.num_free -= num_new
        return True

    def register(self, block_hash: int) -> bool:
        """Publish one of the caller's private, now full, blocks under `block_hash`.

        False when that content is already cached (computed concurrently elsewhere): the block stays private.
        """
        if block_hash in self._refs:
            return False
        self._refs[block_hash] = 1
        return True

    def release(self, private_blocks: int, hashes: list[int]) -> None:
        """Give back a request's blocks. Its cached blocks stay reusable; its last blocks get evicted first."""
        self.num_free += private_blocks
        refs, evictable = self._refs, self._evictable
        for block_hash in reversed(hashes):
            count = refs[block_hash] - 1
            refs[block_hash] = count
            if count == 0:
                evictable[block_hash] = None

    def reset_prefix_cache(self) -> int:
        """Drop every unreferenced cached block; returns how many were dropped."""
        dropped = len(self._evictable)
        for block_hash in self._evictable:
            del self._refs[block_hash]
        self._evictable.clear()
        self.num_free += dropped
        return dropped
