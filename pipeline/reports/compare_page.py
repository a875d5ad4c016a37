"""`make compare`'s page, reports/compare.html: the tables as HTML, best-so-far against busy wall time
and against epochs, and the spread of the complete trials. Accuracies in percent, each axis zoomed to
where the studies differ; seeds of one search share a colour, a baseline is a star with a dotted line
at its accuracy. Self-contained: plotly.js is inlined once."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.reports.compare import (
    GroupRecord,
    Reference,
    StudyRecord,
    describe_references,
    group_to_reference,
    percent,
    points_over_default,
    study_to_reference,
)
from pipeline.paths import REPORTS_DIR
from pipeline.progress import clock
from pipeline.search.summary import format_correlation

ZOOM_POINTS = 3.0  # the accuracy axes show at most this many points below the best value plotted
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")
STYLE = """<style>
body { font-family: sans-serif; margin: 1.5em; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
p.note { font-size: 0.85em; color: #444; max-width: 70em; }
</style>"""


def write_page(records: list[StudyRecord], groups: list[GroupRecord], references: dict[str, Reference],
               folder: Path = REPORTS_DIR) -> Path:
    """reports/compare.html (or ``folder``/compare.html); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compare.html"
    path.write_text(comparison_page(records, groups, references))
    return path


def comparison_page(records: list[StudyRecord], groups: list[GroupRecord], references: dict[str, Reference]) -> str:
    """The page: the tables, then each model family's figures (an MLP at 91 % and a CNN at 95 % on one
    zoomed axis would hide one of them)."""
    from pipeline.tracking.figures import self_contained_html

    colour = {g.group: COLOURS[i % len(COLOURS)] for i, g in enumerate(groups)}
    figures = {}
    for family in dict.fromkeys(r.model_family for r in records):
        members = [r for r in records if r.model_family == family]
        for name, figure in family_figures(family, members, colour, references.get(family)).items():
            figures[f"{family}-{name}"] = figure
    page = self_contained_html(figures, "Studies compared")
    tables = (f"<h2>Searches over their seeds, and baselines</h2>{groups_table(groups, references)}"
              f"<h2>Every study</h2>{studies_table(records, references)}"
              f"<p class='note'>The reference: {html.escape(describe_references(references))}, less 0.2 points. "
              f"{NOTES}</p>")
    return page.replace("<head>", "<head>" + STYLE, 1).replace("</h1>", "</h1>" + tables, 1)


def family_figures(family: str, records: list[StudyRecord], colour: dict[str, str],
                   reference: Reference | None) -> dict:
    """One model family's best-so-far against busy wall time and against epochs, and the spread of its
    complete trials, accuracy in percent zoomed to the family's data."""
    import plotly.graph_objects as go

    against_time, against_epochs, spread = go.Figure(), go.Figure(), go.Figure()
    seen_in_group: dict[str, int] = {}
    for r in records:
        dash = DASHES[seen_in_group.get(r.group, 0) % len(DASHES)]
        seen_in_group[r.group] = seen_in_group.get(r.group, 0) + 1
        seconds, epochs, best = zip(*r.curve) if r.curve else ((), (), ())
        as_percent = [b * 100 for b in best]
        for figure, xs in ((against_time, [s / 60 for s in seconds]), (against_epochs, epochs)):
            if r.kind == "baseline":
                _baseline_trace(figure, go, r, xs, as_percent, colour[r.group])
            else:
                figure.add_trace(go.Scatter(x=xs, y=as_percent, name=r.study, legendgroup=r.group,
                                            mode="lines+markers", line_shape="hv", marker_size=4,
                                            line={"color": colour[r.group], "dash": dash}))
        spread.add_trace(go.Box(y=[v * 100 for v in r.values], name=r.study, boxpoints="all", jitter=0.4,
                                marker_color=colour[r.group]))
    levels = []
    if reference is not None:
        levels.append(reference.level)
        for figure in (against_time, against_epochs):
            figure.add_hline(y=reference.level * 100, line={"color": "grey", "width": 1},
                             annotation_text=f"reference: {reference.group}'s median best - 0.2",
                             annotation_position="bottom left")
    low, high = zoomed_range([b for r in records for _, _, b in r.curve] + levels)
    percent_axis = {"ticksuffix": " %", "range": [low, high], "title": "validation accuracy"}
    against_time.update_layout(title=f"{family}: best validation accuracy so far, against busy wall time",
                               xaxis_title="minutes", yaxis=percent_axis)
    against_epochs.update_layout(title=f"{family}: best validation accuracy so far, against epochs spent",
                                 xaxis_title="epochs", yaxis=percent_axis)
    values = [v for r in records for v in r.values]
    spread.update_layout(title=f"{family}: validation accuracy of the complete trials", showlegend=False,
                         yaxis={**percent_axis, "range": list(zoomed_range(values))})
    return {"time": against_time, "epochs": against_epochs, "spread": spread}


def _baseline_trace(figure, go, record: StudyRecord, xs, ys, colour: str) -> None:
    """A baseline is one training run: a star where it ended, and a dotted line at its accuracy."""
    if not ys:
        return
    figure.add_trace(go.Scatter(x=[xs[-1]], y=[ys[-1]], name=f"{record.study} (the default, trained alone)",
                                mode="markers", marker={"symbol": "star", "size": 14, "color": colour}))
    figure.add_hline(y=ys[-1], line={"color": colour, "dash": "dot", "width": 1})


def zoomed_range(accuracies: list[float]) -> tuple[float, float]:
    """An axis range in percent around ``accuracies`` (fractions): from the lowest value, or ZOOM_POINTS
    below the highest when the lowest is further down, to a little above the highest."""
    if not accuracies:
        return 0.0, 100.0
    high, low = max(accuracies) * 100, min(accuracies) * 100
    low = max(low, high - ZOOM_POINTS)
    margin = max(0.05, (high - low) * 0.05)
    return low - margin, high + margin


def groups_table(groups: list[GroupRecord], references: dict[str, Reference]) -> str:
    rows = [["group", "model", "sampler", "pruner", "studies", "best validation: median (low - high)",
             "best searched trial beat the default", "to the reference, median",
             "rank correlation at the first rung, median: with the final value / with the next rung",
             "searched trials reaching the last rung"]]
    for g in groups:
        rows.append([g.group, g.model_family, g.sampler, g.pruner, ", ".join(g.studies),
                     f"{percent(g.best_median)} ({percent(g.best_low)} - {percent(g.best_high)})",
                     f"{g.beat_default} of {g.with_default}" if g.kind == "search" else "-",
                     group_to_reference(g, references),
                     f"{format_correlation(g.first_rung_correlation_median)} / "
                     f"{format_correlation(g.first_rung_next_correlation_median)}",
                     f"{g.reached_last_rung_share:.0%}" if g.reached_last_rung_share is not None else "-"])
    return _table(rows)


def studies_table(records: list[StudyRecord], references: dict[str, Reference]) -> str:
    rows = [["study", "seed", "best validation", "best searched - default (points)", "complete / pruned / failed",
             "epochs run (unpruned)", "busy wall time", "to its best - 0.2", "to the reference",
             "rank correlation at the rungs"]]
    for r in records:
        near = (f"{clock(r.seconds_to_near_best)}, {r.epochs_to_near_best} epochs"
                if r.seconds_to_near_best is not None else "-")
        rungs = "; ".join(_rung_cell(x) for x in (r.pruning or {}).get("rungs", []))
        rows.append([r.study, "-" if r.seed is None else str(r.seed), percent(r.best_val_accuracy),
                     points_over_default(r), f"{r.complete} / {r.pruned} / {r.failed}",
                     f"{r.epochs_run} ({r.epochs_unpruned})", clock(r.wall_seconds), near,
                     study_to_reference(r, references),
                     rungs or "-"])
    return _table(rows)


def _rung_cell(rung: dict) -> str:
    cell = f"epoch {rung['epoch']}: {format_correlation(rung['rank_correlation'])} ({rung['trials']})"
    if "next_epoch" in rung:
        onward = format_correlation(rung["next_rank_correlation"])
        cell += f", to {rung['next_epoch']}: {onward} ({rung['next_trials']})"
    return cell


def _table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


NOTES = """Busy wall time: the time some trial of the study was running (gaps between sessions left
out). By default a model family's reference is its random search with pruning (<code>--reference
GROUP</code> picks another); "to the reference" is the busy time until a study's best so far reached it.
"best searched - default": the best trial of the search itself (a final phase's run left out) against
the default configuration's trial. Rank correlation (Spearman) between a pruning rung's values
and the final values of the trials that ran to the end, and ("to") the next rung's values over every trial
that reached it, with the number of trials in brackets: near 1, the rung ranked them as the later point
did. Only the best trials run to the end, so the first figure is computed on a narrow spread: it
understates. A baseline (<code>make baseline</code>) is the study's default
configuration trained once for the study's time (its latest run); it is never promoted."""
