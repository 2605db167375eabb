"""One request of a captured trace, whatever format it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """A request to replay: when it arrives, how long its prompt and answer are, what it shares.

    `arrival_s` is seconds from the start of the trace. `prefix_blocks` are ids of fixed-size prompt
    blocks (`block_tokens` tokens each, 512 for Mooncake); equal ids mean equal prompt content.
    `prompt`/`messages` carry text when the trace has it; otherwise prompts are synthesised as
    token ids of exactly `input_tokens` length.
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    prefix_blocks: tuple[int, ...] = ()
    block_tokens: int = 512
    session_id: str | None = None
    prompt: str | None = None
    messages: tuple[dict, ...] | None = None
