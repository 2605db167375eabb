"""The simulated engine: vLLM-like continuous batching in simulated time (pure, no I/O).

Each `step()` schedules one batch the way vLLM's v1 scheduler does, asks the performance model how
long it takes, advances the clock by that much and reports the tokens produced:
- running requests first, in admission order: a decode takes 1 token (1 + k with speculative
  decoding), a partly prefilled prompt takes the next chunk; when KV blocks run out, the most recently
  admitted request is preempted (blocks freed, put back at the front of the queue, recomputed later);
- then waiting requests FCFS while fewer than max_num_seqs run and token budget is left (none after
  a preemption in the same step); cached prefix blocks need no compute; without chunked prefill a
  prompt must fit the remaining budget whole.
With async scheduling (vLLM's default) the next step is scheduled while this one runs, so a request
that arrives while the GPU is busy waits one step more before it can be scheduled.
`simulate()` replays a list of arrivals through one engine and returns per-request timings.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from tuner.simulator.config import SimConfig
from tuner.simulator.kv_cache import KVCache, PrefixHasher
from tuner.simulator.perf_model import MemoryPlan, PerfModel, StepBatch
from tuner.simulator.support import check_engine

NATURAL_OUTPUT_MEAN = 256  # without ignore_eos a request "meets EOS" after ~Exp(256) tokens


@dataclass(slots=True, eq=False)
class EngineRequest:
    request_id: str
    prompt_len: int
    target_output: int  # tokens it will produce
    finish_reason: str  # "length" or "stop", once it finishes
    arrival: float
    block_hashes: list[int]
    user_data: object = None  # the server's stream handle
    num_output: int = 0
    num_computed: int = 0  # tokens whose KV exists
    private_blocks: int = 0
    cached_hashes: list[int] = field(default_factory=list)  # cached blocks it references
    registered_upto: int = 0  # prompt blocks already offered to the prefix cache
    admitted: bool = False
    cached_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    finished: bool = False
    aborted: bool = False

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def num_blocks(self) -> int:
        return self.private_blocks + len(self.cached_hashes)


@dataclass
class EngineStats:
    steps: int = 0
    busy_seconds: float = 0.0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_queries: int = 0  # tokens looked up in the prefix cache
    prefix_hits: int = 0  # tokens found there
    draft_tokens: int = 0
    accepted_tokens: int = 0
    finished_requests: int = 0


@dataclass(frozen=True, slots=True)
class StepOutput:
    duration: float
    produced: list[tuple[EngineRequest, int]]  # (request, new tokens); request.finished says if it ended


class SimScheduler:
    """One replica. Not thread-safe; the server drives it from one asyncio task."""

    def __init__(self, config: SimConfig, perf: PerfModel | None = None, replica: int = 0) -> None:
        config = config.resolved()
        check_engine(config)
        self.config = config
        self.perf = perf or PerfModel(config)
        self.memory: MemoryPlan = self.perf.memory_plan()
        self.block_size = config.block_size
        self.kv = KVCache(self.memory.num_blocks, config.block_size)
        limits = config.limits
        self.hasher = PrefixHasher(limits.max_model_len, config.block_size, config.seed) \
            if config.enable_prefix_caching else None
        self.max_num_seqs = limits.max_num_seqs
        self.max_num_batched_tokens = limits.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        spec = config.speculative
        self.spec_tokens = spec.num_speculative_tokens if spec else 0
        self.acceptance = spec.acceptance_rate if spec else 0.0
        self.rng = random.Random(f"{config.seed}/{replica}")
        self.now = 0.0
        self.stats = EngineStats()
        self.async_scheduling = bool(config.async_scheduling)
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self._arriving: deque[tuple[int, EngineRequest]] = deque()  # (first step that may schedule it, request)
        self._requests: dict[str, EngineRequest] = {}
        self._next_id = 0

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int] | np.ndarray | int, max_tokens: int, *, ignore_eos: bool = True,
                    min_tokens: int = 0, request_id: str | None = None, user_data: object = None) -> EngineRequest:
        """Queue a request at the current simulated time. `prompt` is token ids, or a length (unique content)."""
        if request_id is None:
            request_id = f"sim-{self._next_id}"
            self._next_id += 1
        if isinstance(prompt, int):
            prompt_len, hashes = prompt, []
        else:
            prompt_len = len(prompt)
            hashes = self.hasher.block_hashes(np.asarray(prompt, dtype=np.int64)) if self.hasher else []
        if prompt_len < 1 or max_tokens < 1:
            raise ValueError("a request needs at least one prompt token and max_tokens >= 1")
        target, reason = max_tokens, "length"
        if not ignore_eos:
            natural = 1 + int(self.rng.expovariate(1.0 / NATURAL_OUTPUT_MEAN))
            if max(natural, min_tokens) < max_tokens:
                target, reason = max(natural, min_tokens), "stop"
        request = EngineRequest(request_id, prompt_len, target, reason, self.now, hashes, user_data)
        self._requests[request_id] = request
        if self.async_scheduling and self.running:
            self._arriving.append((self.stats.steps + 1, request))
        else:
            self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> bool:
        request = self._requests.pop(request_id, None)
        if request is None or request.finished:
            return False
        if request in self.waiting:
            self.waiting.remove(request)
        elif any(item is request for _, item in self._arriving):
            self._arriving = deque(entry for entry in self._arriving if entry[1] is not request)
        else:
            self.running.remove(request)
            self._release(request)
        request.finished = request.aborted = True
        request.finish_reason = "abort"
        request.finish_time = self.now
        return True

    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting or self._arriving)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._arriving)

    @property
    def num_unfinished(self) -> int:
        return len(self.running) + len(self.waiting) + len(self._arriving)

    def advance_to(self, time: float) -> None:
        """Idle until `time` (the clock never goes back)."""
        self.now = max(self.now, time)

    # ---- one step -----------------------------------------------------------------------------

    def step(self) -> StepOutput:
        self._take_arrivals()
        return self._execute(*self._schedule())

    def _take_arrivals(self) -> None:
        arriving = self._arriving
        while arriving and (arriving[0][0] <= self.stats.steps or not self.running):
            self.waiting.append(arriving.popleft()[1])

    def _schedule(self) -> tuple[StepBatch, list[tuple[EngineRequest, int, bool]]]:
        """vLLM: running requests first (decodes and continuing chunks), then waiting ones, one token budget."""
        budget = self.max_num_batched_tokens
        block_size = self.block_size
        batch = StepBatch()
        scheduled: list[tuple[EngineRequest, int, bool]] = []  # (request, tokens, is_decode)
        running, kv = self.running, self.kv
        preempted = False
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            pending = request.num_tokens - request.num_computed
            decode = pending == 1 and request.num_output > 0
            if decode:
                drafts = min(self.spec_tokens, request.target_output - request.num_output - 1, budget - 1)
                tokens = 1 + max(drafts, 0)
            else:
                tokens = min(pending, budget)
            need = -(-(request.num_computed + tokens) // block_size) - request.num_blocks
            if need > 0 and not kv.allocate(need):
                while True:  # preempt from the back until it fits or the request itself goes
                    victim = running.pop()
                    self._preempt(victim)
                    preempted = True
                    if victim is request or kv.allocate(need):
                        break
                if victim is request:
                    break
            request.private_blocks += max(need, 0)
            context = request.num_computed
            if decode:
                batch.num_decode_seqs += 1
                batch.decode_tokens += tokens
                batch.decode_context += context
                batch.decode_pairs += tokens * context + tokens * (tokens + 1) // 2
                batch.sampled_rows += tokens
                batch.draft_tokens += tokens - 1
            else:
                self._add_prefill(batch, context, tokens, context + tokens == request.num_tokens)
            scheduled.append((request, tokens, decode))
            budget -= tokens
            index += 1

        if not preempted:
            self._admit(batch, scheduled, budget)
        return batch, scheduled

    def _execute(self, batch: StepBatch, scheduled: list[tuple[EngineRequest, int, bool]]) -> StepOutput:
        duration = self.perf.step_time(batch)
        self.now += duration
        stats = self.stats
        stats.steps += 1
        stats.busy_seconds += duration
        produced: list[tuple[EngineRequest, int]] = []
        finished_any = False
        for request, tokens, decode in scheduled:
            if decode:
                drafts = tokens - 1
                accepted = self._accepted_drafts(drafts) if drafts else 0
                stats.draft_tokens += drafts
                stats.accepted_tokens += accepted
                request.num_computed += 1 + accepted
                new_tokens = 1 + accepted
            else:
                request.num_computed += tokens
                if self.hasher is not None:
                    self._register_blocks(request)
                new_tokens = 1 if request.num_computed == request.num_tokens else 0
            if not new_tokens:
                continue
            if request.first_token_time is None:
                request.first_token_time = self.now
                stats.prompt_tokens += request.prompt_len
            request.num_output += new_tokens
            stats.generation_tokens += new_tokens
            produced.append((request, new_tokens))
            if request.num_output >= request.target_output:
                self._finish(request)
                finished_any = True
        if finished_any:
            self.running = [request for request in self.running if not request.finished]
        return StepOutput(duration, produced)

    def _admit(self, batch: StepBatch, scheduled: list[tuple[EngineRequest, int, bool]], budget: int) -> None:
        running, waiting, kv, block_size = self.running, self.waiting, self.kv, self.block_size
        reserved = sum(self._reserved_blocks(r) for r in running)
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            request = waiting[0]
            num_tokens = request.num_tokens
            matched = unreferenced = 0
            if request.block_hashes:
                matched, unreferenced = kv.match_prefix(request.block_hashes, (num_tokens - 1) // block_size)
            computed = matched * block_size
            tokens = num_tokens - computed
            if not self.chunked_prefill and tokens > budget:
                break
            tokens = min(tokens, budget)
            need = -(-(computed + tokens) // block_size) - matched
            if not kv.can_allocate(need + reserved, unreferenced):
                break
            waiting.popleft()
            hits = request.block_hashes[:matched]
            kv.acquire(hits)
            kv.allocate(need)
            request.cached_hashes = list(hits)
            request.registered_upto = matched
            request.private_blocks = need
            request.num_computed = computed
            self.stats.prefix_queries += num_tokens
            self.stats.prefix_hits += computed
            if not request.admitted:
                request.admitted = True
                request.cached_tokens = computed
            running.append(request)
            reserved += self._reserved_blocks(request)
            self._add_prefill(batch, computed, tokens, computed + tokens == num_tokens)
            scheduled.append((request, tokens, False))
            budget -= tokens

    def _reserved_blocks(self, request: EngineRequest) -> int:
        """KV blocks kept free for a running request's future tokens at admission (vLLM keeps none)."""
        return 0

    @staticmethod
    def _add_prefill(batch: StepBatch, context: int, tokens: int, completes: bool) -> None:
        batch.num_prefill_seqs += 1
        batch.prefill_tokens += tokens
        batch.prefill_context += context
        batch.prefill_pairs += tokens * context + tokens * (tokens + 1) / 2
        batch.sampled_rows += completes

    def _accepted_drafts(self, drafts: int) -> int:
        accepted, rate, rng = 0, self.acceptance, self.rng
        while accepted < drafts and rng.random() < rate:
            accepted += 1
        return accepted

    def _register_blocks(self, request: EngineRequest) -> None:
        full = min(request.num_computed // self.block_size, len(request.block_hashes))
        if full <= request.registered_upto:
            return
        kv = self.kv
        for block_hash in request.block_hashes[request.registered_upto:full]:
            if kv.register(block_hash):
                request.cached_hashes.append(block_hash)
                request.private_blocks -= 1
        request.registered_upto = full

    def _release(self, request: EngineRequest) -> None:
        self.kv.release(request.private_blocks, request.cached_hashes)
        request.private_blocks = 0
        request.cached_hashes = []
        request.registered_upto = 0

    def _preempt(self, request: EngineRequest) -> None:
        self._release(request)
        request.num_computed = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: EngineRequest) -> None:
        self._release(request)
        request.finished = True
        request.finish_time = self.now
        self.stats.finished_requests += 1
        self._requests.pop(request.request_id, None)


# ---- offline replay ---------------------------------------------------------------------------

@dataclass(frozen=True)
class SimArrival:
    arrival_s: float
    prompt: Sequence[int] | np.ndarray | int  # token ids, or a length with unique content
    output_tokens: int


@dataclass(frozen=True)
class SimRequestResult:
    arrival_s: float
    start_s: float  # when it was sent (later than arrival under a concurrency limit)
    first_token_s: float
    finish_s: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.start_s

    @property
    def e2e(self) -> float:
        return self.finish_s - self.start_s


@dataclass(frozen=True)
class SimReport:
    results: list[SimRequestResult]
    duration_s: float
    stats: EngineStats
    memory: MemoryPlan

    @property
    def output_throughput(self) -> float:
        return sum(r.output_tokens for r in self.results) / self.duration_s if self.duration_s else 0.0

    def ttft_percentile(self, q: float) -> float:
        return float(np.percentile([r.ttft for r in self.results], q))

    @property
    def mean_ttft(self) -> float:
        return float(np.mean([r.ttft for r in self.results]))


def simulate(config: SimConfig, arrivals: Iterable[SimArrival], max_concurrency: int | None = None,
             scheduler: Callable[[SimConfig], SimScheduler] = SimScheduler) -> SimReport:
    """Replay `arrivals` (ignore_eos, exact output lengths) through one engine in simulated time.

    With `max_concurrency`, a request is sent only when fewer than that many are in flight, like
    `vllm bench serve --max-concurrency`; TTFT and e2e then count from when it was sent. `scheduler`
    builds the engine (`tuner.simulator.schedulers.make_engine` picks it from `config.engine`).
    """
    if config.engine != "vllm" and scheduler is SimScheduler:
        raise ValueError(f"simulating {config.engine}: pass scheduler=tuner.simulator.schedulers.make_engine")
    engine = scheduler(config)
    queue = deque(sorted(arrivals, key=lambda a: a.arrival_s))
    limit = max_concurrency or math.inf
    sent_at: dict[str, float] = {}
    results: list[SimRequestResult] = []
    start = queue[0].arrival_s if queue else 0.0
    engine.advance_to(start)
    while queue or engine.has_unfinished():
        if queue and not engine.has_unfinished():
            engine.advance_to(queue[0].arrival_s)
        while queue and queue[0].arrival_s <= engine.now and engine.num_unfinished < limit:
            arrival = queue.popleft()
            request = engine.add_request(arrival.prompt, arrival.output_tokens, user_data=arrival)
            sent_at[request.request_id] = engine.now
        output = engine.step()
        if not output.produced and output.duration == 0.0 and not engine.running:
            raise RuntimeError("simulated engine made no progress (request larger than the KV cache?)")
        for request, _ in output.produced:
            if request.finished:
                arrival = cast(SimArrival, request.user_data)
                assert request.first_token_time is not None and request.finish_time is not None
                results.append(SimRequestResult(arrival.arrival_s, sent_at.pop(request.request_id),
                                             request.first_token_time, request.finish_time, request.prompt_len,
                                             request.num_output, request.cached_tokens, request.num_preemptions))
    return SimReport(results, engine.now - start, engine.stats, engine.memory)
