"""The trial scheduler on a fake pool (no Ray): packing, no starvation, rejections, the time budget."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from tuner.study.scheduler import Proposal, Scheduler


@dataclass
class FakePool:
    """One node of `total_gpus`; trials finish in the order they were submitted."""

    total_gpus: int
    shared_cluster: bool = False
    running: deque = field(default_factory=deque)
    log: list = field(default_factory=list)  # ("start" | "end", number, gpus held after)

    @property
    def held(self) -> int:
        return sum(gpus for _, gpus in self.running)

    @property
    def free_gpus(self) -> int:
        return self.total_gpus - self.held

    @property
    def largest_node(self) -> int:
        return self.total_gpus

    def fits(self, need: int) -> bool:
        return need <= self.free_gpus

    def submit(self, spec: int, gpus: int) -> None:
        assert self.fits(gpus), "the scheduler launched a trial that does not fit"
        self.running.append((spec, gpus))
        self.log.append(("start", spec, self.held))

    def wait_one(self, timeout_s: float | None = None) -> int:
        number, _ = self.running.popleft()
        self.log.append(("end", number, self.held))
        return number

    def wait_for_room(self, need: int) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.running)


def _scheduler(pool: FakePool, sizes: list[int | None], trials: int, **kw) -> tuple[Scheduler, list[int], list]:
    """`sizes`: GPUs of each proposal in turn (None: rejected before launch)."""
    asked = iter(range(10_000))
    collected: list[int] = []
    put_back: list = []

    def propose(largest: int) -> Proposal | None:
        number = next(asked)
        need = sizes[number % len(sizes)]
        return None if need is None else Proposal(number, "fake", {}, False, need)

    scheduler = Scheduler(pool=pool, propose=propose, launch=lambda p: pool.submit(p.number, p.need),
                          collect=collected.append, wanted=lambda in_flight: len(collected) + in_flight < trials,
                          put_back=put_back.append, max_rejected=kw.pop("max_rejected", 100), say=lambda _: None,
                          **kw)
    return scheduler, collected, put_back


def test_small_trials_fill_idle_gpus_while_a_large_one_waits_and_the_large_one_is_not_starved():
    pool = FakePool(total_gpus=4)
    scheduler, collected, _ = _scheduler(pool, [1, 1, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1], trials=24)
    scheduler.run()
    assert sorted(collected) == sorted(set(collected)) and len(collected) == 24
    large = [n for n in collected if n % 12 == 2]
    assert len(large) == 2  # both 4-GPU trials ran
    starts = [n for kind, n, _ in pool.log if kind == "start"]
    first_large = starts.index(2)
    assert starts[:first_large] != list(range(first_large))  # later 1-GPU proposals went ahead of it...
    assert first_large <= 2 + scheduler.pass_over_limit  # ...but only until it was passed over enough times
    assert max(held for _, _, held in pool.log) <= 4


def test_strict_order_without_lookahead_launches_in_proposal_order():
    pool = FakePool(total_gpus=4)
    scheduler, collected, _ = _scheduler(pool, [1, 4, 1], trials=9, lookahead=1)
    scheduler.run()
    starts = [n for kind, n, _ in pool.log if kind == "start"]
    assert starts == sorted(starts) and len(collected) == 9


def test_rejected_proposals_stop_the_search_after_the_limit():
    pool = FakePool(total_gpus=2)
    scheduler, collected, _ = _scheduler(pool, [None], trials=5, max_rejected=7)
    scheduler.run()
    assert collected == [] and scheduler.rejected == 8


def test_out_of_time_proposals_waiting_for_gpus_are_put_back_and_nothing_new_starts():
    pool = FakePool(total_gpus=2)
    scheduler, collected, put_back = _scheduler(pool, [2], trials=10, deadline=time.monotonic() - 1)
    scheduler.run()
    assert collected == [] and put_back == [] and pool.log == []  # past the deadline: nothing proposed
    pool = FakePool(total_gpus=2)
    scheduler, collected, put_back = _scheduler(pool, [2, 2], trials=10)
    scheduler.pending.append(Proposal(99, "fake", {}, False, 3))  # can never fit: waits for GPUs
    scheduler.deadline = time.monotonic() + 0.05
    scheduler.run()
    assert [p.number for p in put_back] == [99] and all(n != 99 for n in collected)
