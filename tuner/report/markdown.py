"""Reports as text: the Markdown file of one study, the console summary, several studies side by side."""

from __future__ import annotations

import shlex
from collections import Counter
from collections.abc import Sequence

from tuner.metrics import metric as metric_of
from tuner.records.capacity import CapacityResult
from tuner.records.objectives import THROUGHPUT
from tuner.records.pareto import Point, front_table
from tuner.report.hypervolume import hypervolume_2d, reference_latency
from tuner.report.importance import Importances
from tuner.report.results import STOPPED, StudyResult
from tuner.report.startup import median_phase, median_ready
from tuner.tracking.plots import NO_PNG

SIMULATED_NOTE = ("> **SIMULATED**: these figures come from servetune's performance model of the GPU, not from a "
                  "GPU. Confirm a recommendation on real hardware.")


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _goodput(result: StudyResult, point: Point) -> str:
    return _num(result.goodput.get(point.number), 2)


def _slo_text(result: StudyResult) -> str:
    if result.slo is None:
        return "none"
    return f"`{result.slo}` ({'given to the report' if result.slo_source == 'report' else 'the study’s own'})"


def _recommendation_text(result: StudyResult) -> str:
    primary = result.objectives.primary
    if result.slo is None:
        return f"best {primary}"
    if result.best is not None and not result.best.feasible:
        return f"best {primary}; no trial met every SLO percentile"
    return f"best {primary} within the SLO"


def facts_table(result: StudyResult) -> str:
    trials = (f"{len(result.points)} completed, {len(result.issues)} failed or pruned, "
              f"{sum(result.rejected.values())} never launched (constraints)"
              + (f", {result.running} running or queued" if result.running else ""))
    rows = [
        ["engine(s)", ", ".join(result.engines) or "?"],
        ["model", f"`{result.model}`"],
        ["GPUs", f"{result.gpus} × {result.gpu}"],
        ["workload", f"`{result.workload}` (sha256 `{result.workload_digest[:12]}`)"],
        ["objectives", ", ".join(f"{m} ({'max' if metric_of(m).maximize else 'min'})"
                                 for m in result.objectives.names)],
        ["SLO", _slo_text(result)],
        ["trials", trials],
    ]
    return md_table(["", ""], rows)


def front_markdown(result: StudyResult) -> str:
    shown = result.front + ([result.baseline] if result.baseline and result.baseline not in result.front else [])
    knobs = result.knobs_that_differ(shown)
    with_slo = result.slo is not None
    several = len({p.gpus for p in shown}) > 1
    header = ["trial", "engine", *(["goodput req/s", "SLO"] if with_slo else []), *(["GPUs"] if several else []),
              "tok/s", *(f"{m} ms" for m in result.objectives.latency), *knobs]
    rows = []
    for p in shown:
        name = f"{p.number} (defaults)" if p.baseline else str(p.number)
        rows.append([name + (" (unreliable)" if p.unreliable else ""), p.engine,
                     *([_goodput(result, p), "ok" if p.feasible else "miss"] if with_slo else []),
                     *([p.gpus] if several else []),
                     _num(p.value(THROUGHPUT)), *(_num(p.value(m), 1) for m in result.objectives.latency),
                     *(p.config.get(k, "-") for k in knobs)])
    note = ("*(defaults)* marks an engine's own defaults, measured first; trial 0, the first engine's defaults, is "
            "the baseline, shown even when it is not on the front.")
    if len(result.engines) > 1:
        note += " A best of another engine is also compared with its own engine's defaults below."
    return md_table(header, rows) + "\n\n" + note


def best_vs_baseline(result: StudyResult) -> str:
    best, base = result.best, result.baseline
    if best is None:
        return "No trial completed."
    lines = [f"Trial {best.number} ({_recommendation_text(result)}):", "", "```", shlex.join(best.command), "```"]
    if result.recommendation is not None:
        lines += ["", *(f"- {line}" for line in result.recommendation.lines()[1:])]
    if base is None:
        return "\n".join(lines + ["", "The defaults baseline did not complete, so there is nothing to compare with."])
    own = result.own_defaults()  # a study of several engines whose best is not the baseline's engine
    compared = [base] if own is None else [base, own]
    ratios = [result.ratios(point) for point in compared]
    rows = [[f"{m} ({metric_of(m).unit})", *(_num(p.value(m), 1) for p in compared), _num(best.value(m), 1),
             *(f"×{r[m]:.2f}" if m in r else "-" for r in ratios)] for m in result.objectives.names]
    if "goodput" not in result.objectives.names:
        rows.append(["goodput (req/s)", *(_goodput(result, p) for p in compared), _goodput(result, best),
                     *(f"×{r['goodput']:.2f}" if "goodput" in r else "-" for r in ratios)])
    named = [f"{p.engine} defaults" if own else "defaults" for p in compared]
    header = ["metric", *(f"{name} (trial {p.number})" for name, p in zip(named, compared)),
              f"best (trial {best.number})", *(f"best / {name}" for name in named)]
    return "\n".join(lines + ["", md_table(header, rows)])


def goodput_section(result: StudyResult, top: int = 10) -> str:
    if result.slo is None:
        return "No SLO was given to the study or the report (`tune report --slo ttft_p99=800ms,...`)."
    text = (f"SLO `{result.slo}`. Goodput counts the requests per second that meet every target on their own; "
            "*SLO* says whether the run's percentiles meet the limits.")
    if all(g is None for g in result.goodput.values()):
        return text + "\n\nThe trials' per-request rows are not available here, so goodput under this SLO is unknown."
    scored = sorted(result.points, key=lambda p: -(result.goodput.get(p.number) or 0.0))[:top]
    rows = [[f"{p.number}{' (defaults)' if p.baseline else ''}", _goodput(result, p), _num(p.value(THROUGHPUT)),
             "ok" if p.feasible else "miss"] for p in scored]
    return text + "\n\n" + md_table(["trial", "goodput req/s", "tok/s", "SLO"], rows)


FINAL_METRICS = (("output_throughput", "tok/s", 0), ("goodput", "goodput req/s", 2),
                 ("p99_ttft_ms", "TTFT p99 ms", 0), ("p99_tpot_ms", "TPOT p99 ms", 1))


def _estimate(estimate: dict | None, digits: int) -> str:
    if not estimate:
        return "-"
    return f"{estimate['mean']:,.{digits}f} ± {(estimate['high'] - estimate['low']) / 2:,.{digits}f}"


def _capacity(capacity: dict | None) -> str:
    return str(CapacityResult.from_attrs(capacity)) if capacity else "-"


def finals_rows(result: StudyResult) -> tuple[list[str], list[list]]:
    """Finalists measured again: mean ± 95% CI per metric, and the capacity found."""
    shown = [(m, label, d) for m, label, d in FINAL_METRICS
             if any(m in f.get("remeasured", {}).get("estimates", {}) for f in result.finals.values())]
    header = ["trial", "repeats", *(label for _, label, _ in shown), "capacity under SLO"]
    rows = []
    for number, final in sorted(result.finals.items()):
        again = final.get("remeasured", {})
        label = f"{number} (defaults)" if result.baseline is not None and number == result.baseline.number else number
        rows.append([label, again.get("repeats", "-"),
                     *(_estimate(again.get("estimates", {}).get(m), d) for m, _, d in shown),
                     _capacity(final.get("capacity"))])
    return header, rows


def importance_section(importances: Importances, png: bool = True) -> str:
    if not importances.ok:
        return importances.note + "."
    rows = [[name, f"{value:.3f}"] for name, value in importances.values.items()]
    return (f"For {importances.target} (PED-ANOVA over the sampled trials; the shares sum to 1):\n\n"
            + md_table(["knob", "importance"], rows) + ("\n\n![parameter importances](importance.png)" if png else ""))


def issues_section(result: StudyResult) -> str:
    parts = []
    if result.issues:
        rows = [[i.number, i.engine, i.state, i.cause, i.message, f"`{i.last_log_line}`" if i.last_log_line else ""]
                for i in result.issues]
        parts.append(md_table(["trial", "engine", "state", "cause", "message", "last log line"], rows))
    else:
        parts.append("No trial failed or was pruned.")
    if result.rejected:
        total = sum(result.rejected.values())
        reasons = "\n".join(f"- {count} × {reason}" for reason, count in result.rejected.most_common(5))
        parts.append(f"{total} proposed configuration(s) never launched (a known constraint, or predicted to "
                     f"fail from earlier failures):\n\n{reasons}")
    return "\n\n".join(parts)


def startup_section(result: StudyResult) -> str:
    rows, campaign, parts = result.startup, result.campaign, []
    ready = median_ready(rows)
    if ready is not None:
        parts.append(f"Ready (launch to the first healthy answer): **median {ready:.1f} s** over {len(rows)} "
                     f"server(s), {min(r.ready_s for r in rows):.1f}-{max(r.ready_s for r in rows):.1f} s.")
        names = list(dict.fromkeys(name for row in rows for name in row.phases))
        table: list[list[object]] = [[row.number, row.engine, "yes" if row.forked else "no",
                                      *(_num(row.phases[n], 1) if n in row.phases else "" for n in names),
                                      _num(row.ready_s, 1)] for row in rows]
        if names:
            table.append(["median", "", "", *(_num(median_phase(rows, n), 1) for n in names), _num(ready, 1)])
            parts.append(md_table(["trial", "engine", "forked", *names, "ready"], table) + "\n\nSeconds, read from "
                         "each server's own log (the engine adapter's start-up lines); `other` is what no line "
                         "accounts for.")
        else:
            parts.append(md_table(["trial", "engine", "forked", "ready"], table))
    else:
        parts.append("No server of this study answered.")
    if campaign.get("held_gpu_s"):
        parts.append(f"GPU time of this run of the study: measuring / held **{campaign.get('utilisation', 0):.2f}** "
                     f"({campaign.get('measuring_gpu_s', 0):.0f} of {campaign['held_gpu_s']:.0f} GPU-s held on "
                     f"{campaign.get('gpus', '?')} GPU(s); start-up, teardown and idle GPUs count as held).")
    return "\n\n".join(parts)


def study_markdown(result: StudyResult, importances: Importances, pngs: bool = True) -> str:
    """`pngs`: whether the PNG figures were drawn (matplotlib, the `plots` extra, may be missing)."""
    sections = [f"# servetune report: `{result.name}`" + (" (SIMULATED)" if result.simulated else "")]
    if result.simulated:
        sections.append(SIMULATED_NOTE)
    sections += [facts_table(result)]
    if result.points:
        sections += ["## Pareto front", front_markdown(result),
                     ("![Pareto front](pareto.png)\n\n" if pngs else "") + "Interactive: [pareto.html](pareto.html)",
                     "## Best point vs the engine's defaults", best_vs_baseline(result),
                     "## Goodput under the SLO", goodput_section(result)]
    else:
        sections.append("**No trial completed**: see the failures below.")
    if result.finals:
        header, rows = finals_rows(result)
        sections += ["## Finalists measured again",
                     "Each finalist ran again on a fresh server with the same requests at re-timed arrivals (another "
                     "seed each time): mean ± 95% confidence interval (Student t). Capacity: the highest Poisson "
                     "request rate that met the SLO, found by bisection.\n\n" + md_table(header, rows)]
    sections += ["## Parameter importances", importance_section(importances, pngs),
                 "## Start-up and GPU time", startup_section(result),
                 "## Failed and pruned trials", issues_section(result)]
    return "\n\n".join(sections) + "\n"


def front_text(result: StudyResult) -> str:
    """The front and the baseline as an aligned plain-text table (console, pareto.txt)."""
    shown = result.front + ([result.baseline] if result.baseline else [])
    return front_table(result.front, result.objectives, result.baseline, result.knobs_that_differ(shown),
                       slo=result.slo is not None)


def console_text(result: StudyResult, importances: Importances) -> str:
    """What `tune` prints at the end of a run."""
    if not result.points:
        return "no trial completed: see the failures above"
    lines = ["", f"Pareto front (throughput vs {', '.join(result.objectives.latency)}):", front_text(result)]
    if result.best is not None:
        lines += ["", f"recommended (trial {result.best.number}, {_recommendation_text(result)}):",
                  f"  {shlex.join(result.best.command)}"]
        if result.recommendation is not None:
            lines += [f"  {line}" for line in result.recommendation.lines()]
        ratio = result.ratios().get(THROUGHPUT)
        if ratio is not None and result.baseline is not None:
            text = f"  throughput ×{ratio:.2f} vs {result.baseline.engine}'s defaults (trial {result.baseline.number})"
            own = result.own_defaults()
            own_ratio = result.ratios(own).get(THROUGHPUT) if own is not None else None
            if own is not None and own_ratio is not None:
                text += f", ×{own_ratio:.2f} vs {own.engine}'s own (trial {own.number})"
            lines.append(text)
    if importances.ok:
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(importances.values.items())[:3])
        lines += ["", f"knobs that mattered most for {importances.target}: {top}"]
    if result.finals:
        header, rows = finals_rows(result)
        lines += ["", "finalists measured again (mean ± 95% CI):"]
        lines += ["  " + " | ".join(f"{h} {v}" for h, v in zip(header, row)) for row in rows]
    stopped = Counter(i.cause[len(STOPPED):] for i in result.issues if i.cause.startswith(STOPPED))
    failed = Counter(i.cause for i in result.issues if not i.cause.startswith(STOPPED))
    if stopped:
        lines += ["", f"{sum(stopped.values())} trial(s) stopped early "
                      f"({', '.join(f'{c} ×{n}' for c, n in stopped.most_common())}); reasons in report.md"]
    if failed:
        causes = ", ".join(f"{c} ×{n}" for c, n in failed.most_common())
        lines += ["", f"{sum(failed.values())} trial(s) failed ({causes}); causes and log lines in report.md"]
    return "\n".join(lines)


def common_reference(results: list[StudyResult], metric: str) -> tuple[float, float]:
    """One hypervolume reference for studies compared side by side."""
    limits = {r.slo_limit_ms(metric) for r in results}
    limit = limits.pop() if len(limits) == 1 else None
    return 0.0, reference_latency(limit, [p.value(metric) for r in results for p in r.points])


def comparison_markdown(results: list[StudyResult], png_name: str | None) -> str:
    metric = results[0].first_latency
    reference = common_reference(results, metric)
    volumes = [hypervolume_2d([(p.value(THROUGHPUT), p.value(metric)) for p in r.front], reference) for r in results]
    largest = max(volumes) or 1.0
    rows = []
    for result, volume in zip(results, volumes):
        best, base = result.best, result.baseline
        best_good = result.best_goodput()
        rows.append([f"`{result.name}`", "+".join(result.engines) + (" (SIMULATED)" if result.simulated else ""),
                     f"{result.gpus} × {result.gpu}", result.model.rsplit("/", 1)[-1],
                     f"{len(result.points)}/{len(result.issues)}",
                     _num(best.value(THROUGHPUT)) if best else "-", _num(best.value(metric), 1) if best else "-",
                     _num(best_good[1], 2) if best_good else "-", _num(base.value(THROUGHPUT)) if base else "-",
                     f"×{result.ratios()[THROUGHPUT]:.2f}" if THROUGHPUT in result.ratios() else "-",
                     f"{100 * volume / largest:.0f}%"])
    slos = {str(r.slo) if r.slo else "none" for r in results}
    sections = [f"# servetune comparison: {' vs '.join(f'`{r.name}`' for r in results)}"]
    if any(r.simulated for r in results):
        sections.append(SIMULATED_NOTE)
    sections.append(f"SLO: {', '.join(f'`{s}`' for s in sorted(slos))}"
                    + (" (the studies differ: each is judged against its own)" if len(slos) > 1 else "")
                    + f". Hypervolume: area under each front in ({THROUGHPUT}, {metric}) up to "
                      f"{metric} = {reference[1]:,.0f} ms, as a share of the largest.")
    sections.append(md_table(["study", "engine", "GPUs", "model", "trials ok/failed", "best tok/s", f"best {metric} ms",
                              "best goodput req/s", "defaults tok/s", "best / defaults", "hypervolume"], rows))
    sections.append(f"![Pareto fronts]({png_name})" if png_name else f"({NO_PNG})")
    with_best = [(r, r.best) for r in results if r.best is not None]
    if with_best:
        top, best = max(with_best, key=lambda pair: pair[1].value(THROUGHPUT))
        sections.append(f"**Highest throughput{' within the SLO' if top.slo else ''}:** `{top.name}` ({top.label}), "
                        f"trial {best.number}, {_num(best.value(THROUGHPUT))} tok/s.")
    with_goodput = [(r, g) for r in results if (g := r.best_goodput()) is not None]
    if with_goodput:
        result, (point, value) = max(with_goodput, key=lambda item: item[1][1])
        sections.append(f"**Highest goodput:** `{result.name}` ({result.label}), trial {point.number}, "
                        f"{value:.2f} req/s.")
    sections.append("## Recommended command per study")
    for result in results:
        command = f"```\n{shlex.join(result.best.command)}\n```" if result.best else "no trial met the SLO"
        sections.append(f"**`{result.name}`** ({result.label}):\n\n{command}")
    return "\n\n".join(sections) + "\n"
