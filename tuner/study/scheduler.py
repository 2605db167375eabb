"""The trial scheduler: keeps the GPUs busy with proposals, packs trials of different sizes, collects them.

It knows nothing of Optuna or engines. The study side gives it three callables: `propose(largest_node)`
(a `Proposal`, or None when the proposal was rejected before any launch), `launch(proposal)` (submits it
to the pool), and `collect(finished)` (records a trial the pool is done with); `wanted(in_flight)` says
whether another proposal is wanted now. The pool (`tuner.runner.pool.TrialPool` on Ray, or a fake in
tests) follows `Pool`.

Packing: up to `lookahead` proposals wait for GPUs while later, smaller ones use the idle GPUs; one that
`pass_over_limit` launches have passed then holds GPUs back until it fits, so a large trial is not starved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

MAX_REJECTED_PER_TRIAL = 50
# Twice the GPUs for both bounds came out best for equal-length trials of 1 to 8 GPUs on 8 GPUs in a
# model of the loop (experiments/benchmarks/campaign_efficiency.py): smaller values drain GPUs for large
# trials more often.
LOOKAHEAD_PER_GPU = 2
PASS_OVER_PER_GPU = 2


class Pool(Protocol):
    total_gpus: int
    shared_cluster: bool

    @property
    def free_gpus(self) -> int: ...

    @property
    def largest_node(self) -> int: ...

    def fits(self, need: int) -> bool: ...

    def submit(self, spec: Any, gpus: int) -> None: ...

    def wait_one(self, timeout_s: float | None = None) -> Any: ...

    def wait_for_room(self, need: int) -> bool: ...

    def __len__(self) -> int: ...


@dataclass
class Proposal:
    """A configuration the study proposed that waits for enough GPUs on one node."""

    number: int
    engine: str
    config: dict[str, Any]
    baseline: bool
    need: int
    passed_over: int = 0


@dataclass
class Scheduler:
    pool: Pool
    propose: Callable[[int], Proposal | None]
    launch: Callable[[Proposal], None]
    collect: Callable[[Any], None]
    wanted: Callable[[int], bool]  # argument: trials running or waiting for GPUs
    put_back: Callable[[Proposal], None]  # a proposal never launched because time ran out
    max_rejected: int
    deadline: float | None = None  # time.monotonic() after which nothing new launches
    lookahead: int | None = None  # proposals that may wait for GPUs; 1 = strict order (no packing)
    say: Callable[[str], None] = print
    before_wait: Callable[[], None] = lambda: None  # e.g. redraw the running trials' live lines
    wait_s: float | None = None  # wake this often while trials run (None: only when one finishes)

    def __post_init__(self) -> None:
        gpus = max(1, self.pool.total_gpus)
        self.lookahead = self.lookahead or max(2, LOOKAHEAD_PER_GPU * gpus)
        self.pass_over_limit = max(4, PASS_OVER_PER_GPU * gpus)
        self.pending: list[Proposal] = []
        self.rejected = 0

    def run(self) -> None:
        """Until nothing more is wanted and every launched trial is collected."""
        assert self.lookahead is not None
        while True:
            self._launch_fitting()
            out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
            if out_of_time and self.pending:
                for unlaunched in self.pending:
                    self.put_back(unlaunched)
                self.pending.clear()
            in_flight = len(self.pool) + len(self.pending)
            wanted = not out_of_time and self.rejected <= self.max_rejected and self.wanted(in_flight)
            reserved = any(p.passed_over >= self.pass_over_limit for p in self.pending)
            if wanted and self.pool.free_gpus > 0 and len(self.pending) < self.lookahead and not reserved:
                proposal = self.propose(self.pool.largest_node)
                if proposal is None:
                    self.rejected += 1
                else:
                    self.pending.append(proposal)
                continue
            if not wanted and not self.pending and not len(self.pool):
                return
            self._collect_one()

    def _launch_fitting(self) -> None:
        """Launch, oldest first, every pending proposal that fits now (see the module docstring)."""
        waiting: list[Proposal] = []
        for proposal in list(self.pending):
            if any(w.passed_over >= self.pass_over_limit for w in waiting):
                break
            if self.pool.fits(proposal.need):
                self.launch(proposal)
                self.pending.remove(proposal)
                for w in waiting:
                    w.passed_over += 1
            else:
                waiting.append(proposal)

    def _collect_one(self) -> None:
        """Collect the next trial to finish; with none of ours running, wait for GPUs others hold."""
        if not len(self.pool):
            if not self.pool.wait_for_room(min((p.need for p in self.pending), default=1)):
                self.say("waiting for GPUs that other jobs on the Ray cluster hold")
            return
        self.before_wait()
        finished = self.pool.wait_one(timeout_s=5.0 if self.pool.shared_cluster else self.wait_s)
        if finished is not None:
            self.collect(finished)
