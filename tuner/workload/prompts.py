"""Prompt synthesis: token-id prompts of exact length whose shared prefix blocks are really shared.

Each prefix-block id maps deterministically (given the seed) to the same block of token ids, so a
replay of a Mooncake trace reuses exactly the prefixes the trace reuses. Tokens past the listed
blocks are unique to the request: drawn from its position, arrival and lengths, so two different
traces replayed with the same seed on one server share no prompt (a hold-out slice replayed after
the study's slice found it in vLLM's prefix cache when only the position counted: H200 round 3).
"""

from __future__ import annotations

import numpy as np

from tuner.workload.request import TraceRequest

FIRST_ORDINARY_ID = 100  # keep clear of the special tokens most vocabularies put first


def _token_range(vocab_size: int) -> tuple[int, int]:
    low = min(FIRST_ORDINARY_ID, vocab_size // 10)
    high = vocab_size - 1  # exclusive; skip the last id too
    return low, max(high, low + 1)


def block_token_ids(block_id: int, block_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    low, high = _token_range(vocab_size)
    rng = np.random.default_rng([seed, 1, block_id])
    return rng.integers(low, high, size=block_tokens, dtype=np.int64)


def token_ids_for(request: TraceRequest, index: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Exactly `request.input_tokens` ids; equal prefix-block ids give equal token blocks."""
    parts: list[np.ndarray] = []
    remaining = request.input_tokens
    for block_id in request.prefix_blocks:
        if remaining <= 0:
            break
        block = block_token_ids(block_id, request.block_tokens, vocab_size, seed)[:remaining]
        parts.append(block)
        remaining -= len(block)
    if remaining > 0:
        low, high = _token_range(vocab_size)
        identity = [index, round(abs(request.arrival_s) * 1e6), request.input_tokens, request.output_tokens]
        rng = np.random.default_rng([seed, 2, *identity])
        parts.append(rng.integers(low, high, size=remaining, dtype=np.int64))
    return np.concatenate(parts).tolist() if parts else []


def text_for(request: TraceRequest, index: int, seed: int = 0) -> str:
    """A text prompt when the endpoint needs text: the trace's own, else one word per input token."""
    if request.prompt is not None:
        return request.prompt
    ids = token_ids_for(request, index, vocab_size=32000, seed=seed)
    return " ".join(f"w{i}" for i in ids)
