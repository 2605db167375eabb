"""SGLang's scheduler (0.5.x defaults, no --enable-mixed-chunk) on the simulated engine.

Prefill first: every step that can prefill does only that. The request being chunked continues first
(`--chunked-prefill-size` tokens per step, the config's max_num_batched_tokens), then waiting requests
are admitted FCFS while fewer than `--max-running-requests` (max_num_seqs) run and the KV pool keeps
room for the running requests' future tokens (SGLang's new-token ratio). Only a step with nothing to
prefill decodes, all running requests at once; when the pool runs out the newest are retracted.
So a long prompt stalls every decode for its whole prefill: SGLang's high TPOT p99 under long prompts.
"""

from __future__ import annotations

from tuner.simulator.engine import EngineRequest, SimScheduler
from tuner.simulator.perf_model import StepBatch

NEW_TOKEN_RATIO = 0.4  # share of the remaining output SGLang keeps KV for (0.7 at start, decays to 0.1)
MAX_NEW_TOKENS_ESTIMATE = 4096  # SGLang clips each request's estimate to this


class SglangEngine(SimScheduler):
    def _schedule(self) -> tuple[StepBatch, list[tuple[EngineRequest, int, bool]]]:
        batch, scheduled = StepBatch(), []
        budget = self.max_num_batched_tokens
        for request in self.running:
            pending = request.num_tokens - request.num_computed
            if budget <= 0 or pending <= 0 or (pending == 1 and request.num_output > 0):
                continue
            tokens = min(pending, budget)
            if not self._grow(request, tokens):
                break
            self._add_prefill(batch, request.num_computed, tokens, request.num_computed + tokens == request.num_tokens)
            scheduled.append((request, tokens, False))
            budget -= tokens
        self._admit(batch, scheduled, budget)
        return (batch, scheduled) if scheduled else self._decode_all()

    def _decode_all(self) -> tuple[StepBatch, list[tuple[EngineRequest, int, bool]]]:
        batch, scheduled = StepBatch(), []
        index = 0
        while index < len(self.running):
            request = self.running[index]
            if not self._grow(request, 1):
                victim = self.running.pop()
                self._preempt(victim)
                continue  # retry the same request with the room the victim left (or stop if it was the victim)
            context = request.num_computed
            batch.num_decode_seqs += 1
            batch.decode_tokens += 1
            batch.decode_context += context
            batch.decode_pairs += context + 1
            batch.sampled_rows += 1
            scheduled.append((request, 1, True))
            index += 1
        return batch, scheduled

    def _grow(self, request: EngineRequest, tokens: int) -> bool:
        need = -(-(request.num_computed + tokens) // self.block_size) - request.num_blocks
        if need > 0 and not self.kv.allocate(need):
            return False
        request.private_blocks += max(need, 0)
        return True

    def _reserved_blocks(self, request: EngineRequest) -> int:
        remaining = min(request.target_output - request.num_output, MAX_NEW_TOKENS_ESTIMATE)
        return int(remaining * NEW_TOKEN_RATIO) // self.block_size
