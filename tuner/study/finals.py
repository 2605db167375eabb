"""After the search: the best configurations and the defaults measured again on fresh servers, and the
highest request rate the best ones sustain within the SLO.

Each finalist and the defaults run `repeats` times with arrivals re-timed by another seed (mean and 95 %
CI, Student t), so that "better than the defaults" can be claimed only beyond noise
(`tuner.records.recommend`); with `capacity`, a bisection on the Poisson rate on one running server. Results
go to the study record's `finals` (trial number -> `remeasured`, `capacity`); a rerun does not redo them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tuner.records.objectives import Objectives
from tuner.records.pareto import Point, completed_points, pick
from tuner.records.reliability import unreliable_reasons
from tuner.runner.trial import TrialOutcome, TrialSpec
from tuner.space.constraints import gpus_needed
from tuner.study.capacity import CapacitySearch
from tuner.study.fidelity import estimates_of, retimed
from tuner.study.session import StudySession

if TYPE_CHECKING:
    from tuner.runner.pool import Finished, TrialPool


class Finals:
    def __init__(self, options: Any, objectives: Objectives, session: StudySession,
                 trial_spec: Callable[[int, str, dict[str, Any], bool], TrialSpec], offered_rate: float,
                 say: Callable[[str], None], on_finished: Callable[[Finished], object] = lambda _: None) -> None:
        """`options`: the study's `TuneOptions`; `trial_spec(number, engine, config, baseline)` builds a run;
        `on_finished` sees every run the pool finishes (the campaign's schedule)."""
        self.options, self.objectives, self.session = options, objectives, session
        self.trial_spec, self.offered_rate, self.say = trial_spec, offered_rate, say
        self.on_finished = on_finished

    def run(self, pool: TrialPool) -> None:
        """Measure the chosen configurations again (see the module docstring). Unreliable measurements are
        neither chosen nor counted while reliable ones exist."""
        o, session = self.options, self.session
        count = o.finalists or (3 if o.capacity else 0)
        chosen = self.chosen(count) if count else []
        if not chosen:
            if count:
                self.say("no completed trial to measure again")
            return
        finals: dict[str, dict[str, Any]] = dict(session.record().finals)
        seed = (o.seed or 0) + 1000
        span_s = o.requests[-1].arrival_s - o.requests[0].arrival_s
        runs: list[TrialSpec] = []
        for index, point in enumerate(chosen):  # the `count` best, then the defaults unless among them
            if gpus_needed(point.config) > pool.largest_node:
                self.say(f"note: trial {point.number} needs more GPUs than one node now has; not measured again")
                continue
            done = finals.get(str(point.number), {})
            if o.finalists and "remeasured" not in done:
                for k in range(o.repeats):
                    spec = self.trial_spec(point.number, point.engine, point.config, point.baseline)
                    spec.requests, spec.label = retimed(o.requests, seed + k), f"repeat-{k + 1}"
                    runs.append(spec)
            if o.capacity and "capacity" not in done and o.slo is not None and span_s > 0 and index < count:
                spec = self.trial_spec(point.number, point.engine, point.config, point.baseline)
                spec.label = "capacity"
                spec.measure = CapacitySearch(o.slo, start=(len(o.requests) - 1) / span_s,
                                              attainment=o.attainment, seed=seed)
                runs.append(spec)
        if runs:
            again = sum(1 for spec in runs if spec.label != "capacity")
            self.say(f"\nfinalists: trials {', '.join(str(p.number) for p in chosen)} (defaults included): "
                     f"{again} re-timed replay(s) on fresh servers, {len(runs) - again} capacity search(es)")
        repeats: dict[int, list[TrialOutcome | None]] = {}
        for spec, outcome in self._run_all(pool, runs):
            if spec.label != "capacity":
                repeats.setdefault(spec.number, []).append(outcome)
            elif outcome is not None and outcome.ok:
                finals.setdefault(str(spec.number), {})["capacity"] = outcome.measured.as_attrs()
        for number, outcomes in repeats.items():
            kept = [r for r in outcomes if r is not None and r.ok]
            summaries = [r.summary for r in kept if not unreliable_reasons(r.summary, r.engine_metrics)] or [
                r.summary for r in kept]
            if summaries:
                finals.setdefault(str(number), {})["remeasured"] = {
                    "repeats": len(summaries), "failed": len(outcomes) - len(kept),
                    "unreliable": sum(bool(unreliable_reasons(r.summary, r.engine_metrics)) for r in kept),
                    "estimates": {k: {"mean": e.mean, "low": e.low, "high": e.high, "values": list(e.values)}
                                  for k, e in estimates_of(summaries).items()}}
        session.save_study(finals=finals)

    def chosen(self, count: int) -> list[Point]:
        """The `count` best distinct configurations by the study's ranking (`pareto.pick`), and the defaults."""
        points = completed_points(self.session.study)
        rest = [p for p in points if not p.unreliable] or points
        chosen: list[Point] = []
        seen: set[tuple] = set()
        while rest and len(chosen) < count:
            best = pick(rest, self.objectives, offered_rate=self.offered_rate)
            assert best is not None
            rest = [p for p in rest if p is not best]
            signature = tuple(sorted((k, str(v)) for k, v in best.config.items()))
            if signature not in seen:
                seen.add(signature)
                chosen.append(best)
        baseline = next((p for p in completed_points(self.session.study) if p.baseline), None)
        if baseline is not None and not any(p.baseline for p in chosen):
            chosen.append(baseline)
        return chosen

    def _run_all(self, pool: TrialPool, specs: list[TrialSpec]) -> list[tuple[TrialSpec, TrialOutcome | None]]:
        """Run `specs` on the pool, as many at once as the GPUs allow; (spec, outcome or None) in finishing order."""
        queue: list[TrialSpec] = list(specs)
        done: list[tuple[TrialSpec, TrialOutcome | None]] = []
        while queue or len(pool):
            while queue and pool.fits(gpus_needed(queue[0].launch.config)):
                spec = queue.pop(0)
                pool.submit(spec, gpus_needed(spec.launch.config))
            if not len(pool):
                pool.wait_for_room(gpus_needed(queue[0].launch.config))
                continue
            finished = pool.wait_one(timeout_s=5.0 if pool.shared_cluster else None)
            if finished is None:
                continue
            done.append((finished.spec, finished.outcome))
            self.on_finished(finished)
            outcome = finished.outcome
            text = ("lost or raised: " + finished.error if outcome is None
                    else f"FAILED ({outcome.failure}: {outcome.message})" if not outcome.ok
                    else f"capacity {outcome.measured}" if outcome.measured is not None
                    else f"goodput {outcome.summary.get('goodput') or 0:.3g} req/s, "
                         f"{outcome.summary.get('output_throughput', 0):.0f} tok/s")
            self.say(f"[finalists {len(done)}/{len(specs)}] trial {finished.spec.number} "
                     f"{finished.spec.label}: {text}")
        return done
