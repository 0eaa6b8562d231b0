"""The fairness report of one model, from the table and gate of :mod:`scin_pipeline.core.fairness`: a plot
per attribute and metric (point and interval per group, the overall value as a band), the Markdown report
and one self-contained HTML page (inline CSS, plots as ``data:`` URIs). The model card quotes its wide
per-group table.

Plots are drawn on :class:`matplotlib.figure.Figure` objects (no pyplot global state).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from scin_pipeline.core.evaluation import figure_png
from scin_pipeline.core.fairness import CI_BOOTSTRAP, FAIRNESS_METRICS, GateResult
from scin_pipeline.core.rendering import html_img, html_table, markdown_text_table
from scin_pipeline.core.schema import ATTRIBUTE_TITLES, OVERALL

SYNTHETIC_BANNER = (
    "SYNTHETIC DATA: the images of this run are synthetic; no number in this report "
    "describes how a model performs on real skin"
)


# ------------------------------------------------------------------------------------------ plots


def plot_key(attribute: str, metric: str) -> str:
    """Name of a fairness plot in the ``plots`` dict of :func:`fairness_html`."""
    return f"{attribute}.{metric}"


# Inches per group on the x axis, and the least width that holds the title and the two-column legend.
_INCHES_PER_GROUP = 0.75
_MIN_PLOT_WIDTH = 7.0


def fairness_plot_figure(table: pd.DataFrame, attribute: str, metric: str) -> Figure:
    """Point and interval per group of ``attribute`` on ``metric``; overall value as a line with its
    interval as a band; insufficient-data groups grey, the worst group red; n under each group.

    The figure is sized from the number of groups (every tick label has its room) and the legend sits
    under the axes, outside the points, with constrained layout reserving its space: nothing is drawn
    outside the canvas whatever the number of groups (tested on the renderer's extents)."""
    rows = table[(table["attribute"] == attribute) & (table["metric"] == metric)].reset_index(drop=True)
    if rows.empty:
        raise ValueError(f"the fairness table has no rows for {attribute!r} / {metric!r}")
    overall = table[(table["attribute"] == OVERALL) & (table["metric"] == metric)]
    rotated = len(rows) > 6
    width = max(_MIN_PLOT_WIDTH, _INCHES_PER_GROUP * len(rows) + 2.5)
    figure = Figure(figsize=(width, 5.2 if rotated else 4.8), layout="constrained")
    ax = figure.add_subplot()
    level = float(rows["ci_level"].iloc[0]) if "ci_level" in rows else 0.95
    handles = []
    if not overall.empty:
        o = overall.iloc[0]
        handles.append(ax.axhline(o["value"], color="#4c72b0", lw=1, ls="--", label=f"overall {o['value']:.3f}"))
        if np.isfinite(o["ci_low"]) and np.isfinite(o["ci_high"]):
            band = f"overall's {level:.0%} interval"
            handles.append(ax.axhspan(o["ci_low"], o["ci_high"], color="#4c72b0", alpha=0.12, lw=0, label=band))
    styles = {
        "group": ("#222222", f"group estimate, {level:.0%} bootstrap (or Wilson) interval"),
        "insufficient": ("#aaaaaa", "insufficient data (too few cases to judge)"),
        "worst": ("#c44e52", "worst judged group"),
    }
    shown: set[str] = set()
    for i, (_, row) in enumerate(rows.iterrows()):
        style = "insufficient" if row["insufficient_data"] else ("worst" if row["worst"] else "group")
        colour, label = styles[style]
        low = row["value"] - row["ci_low"] if np.isfinite(row["ci_low"]) else 0.0
        high = row["ci_high"] - row["value"] if np.isfinite(row["ci_high"]) else 0.0
        if np.isfinite(row["value"]):
            handle = ax.errorbar(
                [i],
                [row["value"]],
                yerr=[[max(low, 0.0)], [max(high, 0.0)]],
                fmt="o",
                color=colour,
                ecolor=colour,
                capsize=3,
                ms=5,
                label=label,
            )
            if style not in shown:
                handles.append(handle)
                shown.add(style)
    ax.set_xticks(
        range(len(rows)),
        [f"{g}\nn={n:,}" for g, n in zip(rows["group"], rows["n"])],
        rotation=45 if rotated else 0,
        ha="right" if rotated else "center",
        fontsize=8,
    )
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(metric)
    model = str(table["model"].iloc[0]) if len(table) else ""
    ax.set_title(f"{model}: {metric} by {ATTRIBUTE_TITLES.get(attribute, attribute)}", fontsize=10, wrap=True)
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    return figure


def fairness_plot_png(table: pd.DataFrame, attribute: str, metric: str) -> bytes:
    """:func:`fairness_plot_figure` as PNG bytes."""
    return figure_png(fairness_plot_figure(table, attribute, metric))


def fairness_plots(table: pd.DataFrame, metrics: Sequence[str] = ("balanced_accuracy",)) -> dict[str, bytes]:
    """One plot per attribute of the table and metric, keyed by :func:`plot_key`."""
    attributes = [a for a in table["attribute"].unique() if a != OVERALL]
    return {plot_key(a, m): fairness_plot_png(table, a, m) for a in attributes for m in metrics}


# ---------------------------------------------------------------------------------------- reports


def _cell(value: float, low: float, high: float) -> str:
    if not np.isfinite(value):
        return "undefined"
    interval = f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) and np.isfinite(high) else ""
    return f"{value:.3f}{interval}"


def group_metrics_wide(table: pd.DataFrame, attribute: str) -> pd.DataFrame:
    """One row per group: group, n, one 'value [low, high]' cell per metric, and a note."""
    rows = table[table["attribute"] == attribute]
    out = []
    for group, part in rows.groupby("group", sort=False):
        estimates = part[["value", "ci_low", "ci_high"]].to_numpy(dtype="float64")
        cells = {str(m): _cell(*map(float, e)) for m, e in zip(part["metric"], estimates)}
        record = {"group": group, "n": f"{int(part['n'].iloc[0]):,}"}
        record.update({metric: cells[metric] for metric in FAIRNESS_METRICS if metric in cells})
        notes = []
        if bool(part["insufficient_data"].iloc[0]):
            notes.append("insufficient data")
        worst = list(part.loc[part["worst"], "metric"])
        if worst:
            notes.append("worst on " + ", ".join(worst))
        if "ci_method" in part:
            wilson = list(part.loc[part["ci_method"] != CI_BOOTSTRAP, "metric"])
            if wilson:
                notes.append("Wilson interval (bootstrap without spread) on " + ", ".join(wilson))
        record["note"] = "; ".join(notes)
        out.append(record)
    return pd.DataFrame(out)


def _how_to_read(table: pd.DataFrame) -> str:
    level = float(table["ci_level"].iloc[0]) if "ci_level" in table and len(table) else 0.95
    n_boot = int(table["n_boot"].iloc[0]) if "n_boot" in table and len(table) else 0
    return (
        f"Each cell: estimate [{level:.0%} percentile bootstrap interval, {n_boot} resamples within "
        "the group; where every resample gave the same value, e.g. 0 of n right, the Wilson score "
        "interval instead, noted per group]. Groups flagged 'insufficient data' are shown but never "
        "called worst and never decide the gate. 'missing' = not answered; 'multiple' = several "
        "race/ethnicity boxes."
    )


def _attributes(table: pd.DataFrame) -> list[str]:
    return [a for a in table["attribute"].unique() if a != OVERALL]


def _min_n(gate: GateResult) -> str:
    return f", min_group_n {gate.min_group_n}" if gate.min_group_n is not None else ""


def fairness_markdown(table: pd.DataFrame, gate: GateResult, *, model: str, synthetic: bool) -> str:
    """The fairness report as Markdown: synthetic banner first (when synthetic), the gate, the overall
    block and one table per attribute."""
    lines = [SYNTHETIC_BANNER, ""] if synthetic else []
    lines += [
        f"# Fairness report: {model}",
        "",
        f"**Fairness gate: {gate.label}** ({gate.metric}, max_gap {gate.max_gap:.2f}"
        f"{_min_n(gate)}; estimates: {gate.source}). {gate.reason}",
        "",
        _how_to_read(table),
        "",
        f"## {ATTRIBUTE_TITLES[OVERALL]}",
        "",
        markdown_text_table(group_metrics_wide(table, OVERALL).drop(columns=["group", "note"])),
        "",
    ]
    for attribute in _attributes(table):
        lines += [
            f"## {ATTRIBUTE_TITLES.get(attribute, attribute)} (`{attribute}`)",
            "",
            markdown_text_table(group_metrics_wide(table, attribute)),
            "",
        ]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em;color:#222;max-width:1200px}
.banner{background:#fff3cd;border:2px solid #d39e00;padding:.6em 1em;font-weight:bold}
.pass{color:#1e7e34}.fail{color:#b21f2d}.unjudged{color:#b36b00}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}
tr.insufficient td{color:#888}tr.worst td{background:#fde2e2}
img{max-width:100%;display:block;margin:.5em 0}
"""


def _row_class(record: dict) -> str:
    note = str(record.get("note", ""))
    return "insufficient" if "insufficient" in note else "worst" if "worst" in note else ""


def fairness_html(
    table: pd.DataFrame, gate: GateResult, plots: dict[str, bytes], *, model: str, synthetic: bool
) -> str:
    """The fairness report as one self-contained HTML page: inline CSS, plots as ``data:`` URIs, no
    external asset. A plot keyed ``"<attribute>.<metric>"`` is placed under its attribute; any other
    plot at the end."""
    title = f"Fairness report: {model}" + (" (SYNTHETIC)" if synthetic else "")
    status = gate.label
    css = {"passed": "pass", "failed": "fail"}.get(gate.status, "unjudged")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    if synthetic:
        parts.append(f'<p class="banner">{html.escape(SYNTHETIC_BANNER)}</p>')
    parts += [
        f"<h1>{html.escape(f'Fairness report: {model}')}</h1>",
        f'<p><strong class="{css}">Fairness gate: '
        f"{status}</strong> ({html.escape(gate.metric)}, max_gap {gate.max_gap:.2f}"
        f"{html.escape(_min_n(gate))}; estimates: {html.escape(gate.source)}). "
        f"{html.escape(gate.reason)}</p>",
        f"<p>{html.escape(_how_to_read(table))}</p>",
        f"<h2>{html.escape(ATTRIBUTE_TITLES[OVERALL])}</h2>",
        html_table(group_metrics_wide(table, OVERALL).drop(columns=["group", "note"]), _row_class),
    ]
    placed = set()
    for attribute in _attributes(table):
        parts += [
            f"<h2>{html.escape(ATTRIBUTE_TITLES.get(attribute, attribute))} "
            f"(<code>{html.escape(attribute)}</code>)</h2>",
            html_table(group_metrics_wide(table, attribute), _row_class),
        ]
        for name, png in plots.items():
            if name.startswith(f"{attribute}."):
                parts.append(html_img(name, png))
                placed.add(name)
    rest = [name for name in plots if name not in placed]
    if rest:
        parts.append("<h2>Other plots</h2>")
        parts += [html_img(name, plots[name]) for name in rest]
    parts.append("</body></html>")
    return "\n".join(parts)
