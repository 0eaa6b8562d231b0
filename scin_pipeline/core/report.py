"""A reproducible data report over the parsed SCIN metadata: who is represented, which conditions, how
much is labelled, what is missing, and what the image references look like.

The student notebooks explored SCIN by hand; this module computes the same views as tables, plots and
one Markdown document, from the tables of :func:`scin_pipeline.core.metadata.parse_metadata`.

Conventions, applied to every table here:
- A missing value is the group ``"missing"`` (``schema.MISSING_GROUP``, as in the fairness report) and is
  counted, never dropped: what was not answered is part of what the data set is.
- An answer that *is* an answer (``AGE_UNKNOWN``, ``NONE_IDENTIFIED``, ``OTHER_OR_UNSPECIFIED``) keeps its
  own group, distinct from ``"missing"`` (no answer at all).
- Groups come in their natural order (Monk tones 1..10, FST1..FST6, ages ascending), known groups with
  no case included (a zero is information), then unknown values, then ``"missing"``.
- Nothing is timestamped, so the same inputs give the same report.

Plots are drawn on :class:`matplotlib.figure.Figure` objects, never through ``pyplot``: no global state,
no GUI backend, safe in Dagster's threaded executors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from scin_pipeline.core import schema
from scin_pipeline.core.atomic import write_text_atomic
from scin_pipeline.core.rendering import format_cell, markdown_table, png_data_uri
from scin_pipeline.core.schema import ATTRIBUTE_TITLES, MISSING_GROUP

if TYPE_CHECKING:  # matplotlib is imported where a figure is drawn: importing the definitions must not pay it
    from matplotlib.figure import Figure

SYNTHETIC_BANNER = "SYNTHETIC DATA: images in this run are synthetic; no number here describes real skin conditions"
REPORT_MARKDOWN_FILE = "data_report.md"
PLOT_DPI = 100
TOP_CONDITIONS_PLOTTED = 25
TOP_MISSING_COLUMNS_PLOTTED = 30

# Deepest tones, the ones a skin-condition model most often fails on; reported as a headline share.
DEEP_MONK_TONES = (7, 8, 9, 10)

# attribute name in the report -> column of ``cases``. Single-valued: each case is in exactly one group.
SINGLE_VALUED_ATTRIBUTES = {
    "monk_skin_tone_us": "monk_skin_tone_label_us",
    "monk_skin_tone_india": "monk_skin_tone_label_india",
    "fst_self_reported": "fitzpatrick_skin_type",
    "fst_dermatologist": "fst_dermatologist",
    "combined_race": "combined_race",
    "sex_at_birth": "sex_at_birth",
    "age_group": "age_group",
}
# Multi-select: the form let contributors tick several boxes, so a case counts once in *every* group it
# ticked and the shares of this attribute sum to more than 1. A case that ticked none is "missing".
RACE_ATTRIBUTE = "race_ethnicity"
RACE_PREFIX = "race_ethnicity_"
ATTRIBUTE_ORDER = [
    "monk_skin_tone_us",
    "monk_skin_tone_india",
    "fst_self_reported",
    "fst_dermatologist",
    RACE_ATTRIBUTE,
    "combined_race",
    "sex_at_birth",
    "age_group",
]
# Natural group order where the column carries no categorical order of its own.
KNOWN_GROUPS = {
    "monk_skin_tone_label_us": [str(t) for t in schema.MONK_TONES],
    "monk_skin_tone_label_india": [str(t) for t in schema.MONK_TONES],
    "fitzpatrick_skin_type": schema.ENUM_VALUES["fitzpatrick_skin_type"],
    "fst_dermatologist": list(schema.FST_VALUES),
    "sex_at_birth": schema.ENUM_VALUES["sex_at_birth"],
    "age_group": schema.ENUM_VALUES["age_group"],
}

REQUIRED_CASE_COLUMNS = [
    "case_id",
    "has_label",
    "top_label",
    "weighted_label_names",
    "label_status",
    "n_label_graders",
    *SINGLE_VALUED_ATTRIBUTES.values(),
    *schema.RACE_COLUMNS,
]
REQUIRED_IMAGE_COLUMNS = ["case_id", "shot_type", "object_path", "path_status"]
IMAGE_FILE_STATUSES = ["ok", "missing", "corrupt", "rejected"]
LABEL_STATUS_ORDER = ["labelled", "no_pathology", "gradable_unlabelled", "ungradable", "no_labels_row", "malformed"]

PLOT_NAMES = [
    "monk_skin_tone",
    "fitzpatrick",
    "race_ethnicity",
    "sex_and_age",
    "top_conditions",
    "label_coverage",
    "missingness",
]


@dataclass
class DataReport:
    """The data report: tables, plot files, the Markdown document and headline numbers.

    representation  attribute, group, n_cases, share (of all cases), n_labelled, share_labelled (of
                    labelled cases), multi_select (True for race_ethnicity, whose shares sum past 1)
    conditions      condition, n_top_weighted, n_any_mention, share_top_weighted (of labelled cases),
                    rank (1 = most frequent top-weighted label); every condition named in any label
    label_coverage  breakdown, group, n_cases, share (of the breakdown's population: all cases, or the
                    labelled cases for ``n_label_graders_among_labelled``)
    missingness     table, column, n_rows, n_missing, share_missing; most missing first
    images_summary  metric, value, description
    plots           plot name -> PNG file in ``out_dir``
    markdown        the whole report, headline numbers first; plots referenced by file name relative
                    to ``out_dir``
    headline        the headline numbers alone (Markdown, with the synthetic banner when synthetic): short
                    enough for a viewer to show without opening the whole report
    summary_metadata  headline numbers, for Dagster output metadata
    """

    representation: pd.DataFrame
    conditions: pd.DataFrame
    label_coverage: pd.DataFrame
    missingness: pd.DataFrame
    images_summary: pd.DataFrame
    plots: dict[str, Path] = field(default_factory=dict)
    markdown: str = ""
    headline: str = ""
    summary_metadata: dict[str, float | int | str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- tables


def _require_columns(frame: pd.DataFrame, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) needed by the data report: {', '.join(missing)}")


def _share(count: int, population: int) -> float:
    # An empty population has no shares: NaN, not 0 (0 would claim "nobody", which was not measured).
    return float(count) / population if population else float("nan")


def _shares(counts, population: int) -> np.ndarray:
    counts = np.asarray(counts, dtype="float64")
    return counts / population if population else np.full(len(counts), np.nan)


def _group_order(column: str, labels: pd.Series) -> list[str]:
    """Natural order: the column's known vocabulary (every known group, even at 0), then values outside
    it (most frequent first, then by name), then "missing" (always shown, even at 0, so a table's shape
    does not depend on the data)."""
    known = [str(g) for g in KNOWN_GROUPS.get(column, [])]
    present = labels[labels.ne(MISSING_GROUP) & ~labels.isin(known)]
    counts = present.value_counts()
    extras = sorted(counts.index, key=lambda g: (-counts[g], g))
    return known + extras + [MISSING_GROUP]


def _count_rows(
    attribute: str,
    groups: list[str],
    n_cases: list[int],
    n_labelled: list[int],
    total: int,
    total_labelled: int,
    multi_select: bool,
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "attribute": attribute,
            "group": pd.Series(groups, dtype=object),
            "n_cases": np.asarray(n_cases, dtype="int64"),
            "share": _shares(n_cases, total),
            "n_labelled": np.asarray(n_labelled, dtype="int64"),
            "share_labelled": _shares(n_labelled, total_labelled),
            "multi_select": multi_select,
        }
    )


def representation_table(cases: pd.DataFrame) -> pd.DataFrame:
    """How many cases (and labelled cases) fall in each group of each demographic / skin-tone attribute.

    Long form, one row per (attribute, group), attributes in :data:`ATTRIBUTE_ORDER`. ``share`` is of all
    cases given, ``share_labelled`` of the labelled ones (``has_label``), so the same call on a split's
    cases gives that split's composition. Single-valued attributes: shares sum to 1. ``race_ethnicity``
    is multi-select (``multi_select`` True): a case counts in every group it ticked, so its counts equal
    the sums of the ``race_ethnicity_*`` check boxes and its shares sum to more than 1; a case that
    ticked no box is "missing".
    """
    _require_columns(cases, ["has_label", *SINGLE_VALUED_ATTRIBUTES.values(), *schema.RACE_COLUMNS], "cases")
    labelled = cases["has_label"].astype(bool).to_numpy()
    total, total_labelled = len(cases), int(labelled.sum())
    parts = []
    for attribute in ATTRIBUTE_ORDER:
        if attribute == RACE_ATTRIBUTE:
            ticks = cases[schema.RACE_COLUMNS].astype(bool)
            groups = [c.removeprefix(RACE_PREFIX).upper() for c in schema.RACE_COLUMNS]
            none_ticked = ~ticks.any(axis=1)
            n_cases = [int(ticks[c].sum()) for c in schema.RACE_COLUMNS] + [int(none_ticked.sum())]
            n_labelled = [int(ticks[c].to_numpy()[labelled].sum()) for c in schema.RACE_COLUMNS] + [
                int(none_ticked.to_numpy()[labelled].sum())
            ]
            parts.append(
                _count_rows(
                    attribute, groups + [MISSING_GROUP], n_cases, n_labelled, total, total_labelled, multi_select=True
                )
            )
            continue
        column = SINGLE_VALUED_ATTRIBUTES[attribute]
        labels = schema.group_labels(cases[column])
        order = _group_order(column, labels)
        n_cases = labels.value_counts().reindex(order, fill_value=0)
        n_labelled = labels[labelled].value_counts().reindex(order, fill_value=0)
        parts.append(
            _count_rows(
                attribute, order, n_cases.tolist(), n_labelled.tolist(), total, total_labelled, multi_select=False
            )
        )
    return pd.concat(parts, ignore_index=True)


def split_report(table: pd.DataFrame, cases: pd.DataFrame) -> pd.DataFrame:
    """Composition of each split (and of the whole labelled set) by class, Monk tone and Fitzpatrick.

    ``table``: one row per image (case_id, split, label), as labeled_splits; ``cases``: the parsed cases.
    Long form: split ("all", then each split), attribute ("label" or a :func:`representation_table`
    attribute), group, n_cases, share (of the split's cases)."""
    frames = []
    case_rows = cases.set_index("case_id")
    for name, part in [("all", table), *((str(s), g) for s, g in table.groupby("split", observed=True))]:
        split_cases = case_rows.loc[part["case_id"].unique()].reset_index()
        rep = representation_table(split_cases)
        rep = rep[rep["attribute"].isin(["monk_skin_tone_us", "fst_dermatologist", "fst_self_reported"])]
        classes = part.drop_duplicates("case_id")["label"].value_counts()
        class_rows = pd.DataFrame(
            {
                "attribute": "label",
                "group": classes.index.astype(str),
                "n_cases": classes.to_numpy(),
                "share": classes.to_numpy() / max(len(split_cases), 1),
            }
        )
        frames.append(pd.concat([class_rows, rep[["attribute", "group", "n_cases", "share"]]]).assign(split=name))
    return pd.concat(frames, ignore_index=True)[["split", "attribute", "group", "n_cases", "share"]]


def conditions_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Every condition named in any weighted label, with how often it is the top label and how often it
    is mentioned at all. Ranked by top-weighted count, then mentions, then name (ties broken
    deterministically so ranks are reproducible)."""
    _require_columns(cases, ["has_label", "top_label", "weighted_label_names"], "cases")
    top = cases["top_label"].dropna().astype(str).value_counts()
    # A case mentions a condition once however many graders named it: count cases, not mentions.
    mentions = pd.Series(
        [
            name
            for names in cases["weighted_label_names"]
            if isinstance(names, (list, tuple, np.ndarray))
            for name in dict.fromkeys(names)
        ],
        dtype=object,
    ).value_counts()
    names = sorted(set(top.index) | set(mentions.index))
    table = pd.DataFrame(
        {
            "condition": pd.Series(names, dtype=object),
            "n_top_weighted": top.reindex(names, fill_value=0).to_numpy().astype("int64"),
            "n_any_mention": mentions.reindex(names, fill_value=0).to_numpy().astype("int64"),
        }
    )
    table["share_top_weighted"] = _shares(
        table["n_top_weighted"].to_numpy(), int(cases["has_label"].astype(bool).sum())
    )
    table = table.sort_values(
        ["n_top_weighted", "n_any_mention", "condition"], ascending=[False, False, True], kind="stable"
    ).reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1, dtype="int64"))
    return table


def label_coverage_table(cases: pd.DataFrame) -> pd.DataFrame:
    """Why cases have or lack a label (``label_status``, see ``metadata.label_status`` for the rule),
    and by how many dermatologists they were graded (1 or 3 in the release), over all cases and over
    the labelled ones."""
    _require_columns(cases, ["has_label", "label_status", "n_label_graders"], "cases")
    total = len(cases)
    status = schema.group_labels(cases["label_status"])
    status_order = LABEL_STATUS_ORDER + sorted(set(status) - set(LABEL_STATUS_ORDER) - {MISSING_GROUP})
    if (status == MISSING_GROUP).any():
        status_order.append(MISSING_GROUP)
    status_counts = status.value_counts().reindex(status_order, fill_value=0)

    graders = cases["n_label_graders"].astype("Int64")
    labelled = cases["has_label"].astype(bool)
    grader_groups = sorted(int(g) for g in graders.dropna().unique())
    grader_all = graders.value_counts().reindex(grader_groups, fill_value=0)
    grader_labelled = graders[labelled].value_counts().reindex(grader_groups, fill_value=0)
    n_labelled = int(labelled.sum())

    def rows(breakdown, groups, counts, denominator):
        counts = np.asarray(counts, dtype="int64")
        return pd.DataFrame(
            {
                "breakdown": breakdown,
                "group": pd.Series(groups, dtype=object),
                "n_cases": counts,
                "share": _shares(counts, denominator),
            }
        )

    return pd.concat(
        [
            rows("label_status", status_order, status_counts.to_numpy(), total),
            rows("n_label_graders", [str(g) for g in grader_groups], grader_all.to_numpy(), total),
            rows(
                "n_label_graders_among_labelled",
                [str(g) for g in grader_groups],
                grader_labelled.to_numpy(),
                n_labelled,
            ),
        ],
        ignore_index=True,
    )


def _n_missing(series: pd.Series) -> int:
    # None/NaN/NA only. An empty list is an answer ("no label"), not a missing value, and a check box
    # left unticked is False, not missing: both are counted as present.
    if series.dtype == object:
        return int(sum(1 for v in series if schema.is_missing(v)))
    return int(series.isna().sum())


def missingness_table(cases: pd.DataFrame, images: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per column of ``cases`` (and ``images``): how many values are None/NaN. Empty lists and
    unticked check boxes count as present (see :func:`_n_missing`). Most missing first; ties keep the
    column order."""
    rows = []
    for table_name, frame in (("cases", cases), ("images", images)):
        if frame is None:
            continue
        for column in frame.columns:
            n_missing = _n_missing(frame[column])
            rows.append((table_name, column, len(frame), n_missing, _share(n_missing, len(frame))))
    table = pd.DataFrame(rows, columns=["table", "column", "n_rows", "n_missing", "share_missing"])
    table = table.astype({"n_rows": "int64", "n_missing": "int64", "share_missing": "float64"})
    return table.sort_values("share_missing", ascending=False, kind="stable").reset_index(drop=True)


def images_summary_table(
    cases: pd.DataFrame, images: pd.DataFrame, image_files: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Counts describing the image references (and, when given, the fetched image files)."""
    _require_columns(images, REQUIRED_IMAGE_COLUMNS, "images")
    rows: list[tuple[str, int, str]] = []
    refs_per_file = images["object_path"].value_counts()
    shared = refs_per_file[refs_per_file > 1]
    rows += [
        ("n_image_refs", len(images), "image references in the cases table (a case has 1-3)"),
        ("n_distinct_files", len(refs_per_file), "distinct object paths referenced"),
        (
            "n_shared_files",
            len(shared),
            "files referenced more than once (the same file reused by several cases or positions)",
        ),
        ("n_refs_to_shared", int(shared.sum()), "references that point to a shared file"),
        (
            "n_rejected_paths",
            int(images["path_status"].astype(str).eq("rejected").sum()),
            "references whose path is not the accepted form; never fetched",
        ),
    ]
    refs_per_case = images.groupby("case_id").size().reindex(cases["case_id"], fill_value=0)
    for n_refs in sorted(set(refs_per_case.tolist()) | {1, 2, 3}):
        rows.append(
            (
                f"n_cases_with_{n_refs}_image_refs",
                int(refs_per_case.eq(n_refs).sum()),
                f"cases with exactly {n_refs} image reference(s)",
            )
        )
    shots = schema.group_labels(images["shot_type"])
    shot_order = schema.SHOT_TYPE_VALUES + sorted(set(shots) - set(schema.SHOT_TYPE_VALUES) - {MISSING_GROUP})
    for shot in shot_order + [MISSING_GROUP]:
        rows.append(
            (
                f"n_refs_shot_{shot}",
                int(shots.eq(shot).sum()),
                "references with no shot type" if shot == MISSING_GROUP else f"references with shot type {shot}",
            )
        )
    if image_files is not None:
        _require_columns(image_files, ["status"], "image_files")
        status = image_files["status"].astype(str)
        rows.append(("n_files_checked", len(image_files), "image files the fetch step accounted for"))
        for name in IMAGE_FILE_STATUSES + sorted(set(status) - set(IMAGE_FILE_STATUSES)):
            rows.append((f"n_files_{name}", int(status.eq(name).sum()), f"image files with status {name}"))
        if "bytes" in image_files:
            ok_bytes = pd.to_numeric(image_files.loc[status.eq("ok"), "bytes"], errors="coerce")
            rows.append(("n_bytes_ok", int(ok_bytes.fillna(0).sum()), "bytes of the files with status ok"))
    table = pd.DataFrame(rows, columns=["metric", "value", "description"])
    table["value"] = table["value"].astype("int64")
    return table


# ---------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    # Figure, not pyplot: no global figure registry, no GUI backend, thread-safe.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=PLOT_DPI, layout="constrained")


def _save(figure: Figure, path: Path) -> Path:
    # No metadata: the PNG bytes depend only on the data (no software version stamp).
    figure.savefig(path, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return path


def _attribute(representation: pd.DataFrame, attribute: str) -> pd.DataFrame:
    return representation[representation["attribute"] == attribute].reset_index(drop=True)


def _no_data(ax, message: str = "no data") -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)


def _paired_bar_chart(
    path: Path,
    groups: list[str],
    left,
    right,
    left_style: dict,
    right_style: dict,
    *,
    title: str,
    xlabel: str | None = None,
) -> Path:
    """Cases per group from two sources of one attribute: two bars per group, side by side, each labelled
    with its count."""
    figure = _new_figure(10, 5)
    ax = figure.add_subplot()
    x = np.arange(len(groups))
    width = 0.4
    for offset, values, style in ((-width / 2, left, left_style), (width / 2, right, right_style)):
        ax.bar_label(ax.bar(x + offset, values, width, **style), fontsize=7, padding=1)
    ax.set_xticks(x, groups, fontsize=9)
    ax.set_ylabel("cases")
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    ax.margins(y=0.1)
    return _save(figure, path)


def _plot_monk(representation: pd.DataFrame, n_cases: int, path: Path) -> Path:
    us = _attribute(representation, "monk_skin_tone_us")
    india = _attribute(representation, "monk_skin_tone_india")
    colours = [schema.MONK_SKIN_TONE_HEX.get(int(g), "#bdbdbd") if g.isdigit() else "#bdbdbd" for g in us["group"]]
    # Same swatch colour for both grader pools (the bar *is* the tone); hatching tells them apart, and a
    # dark edge keeps the near-white swatches visible.
    return _paired_bar_chart(
        path,
        [f"tone {g}" if g.isdigit() else g for g in us["group"]],
        us["n_cases"],
        india["n_cases"],
        dict(color=colours, edgecolor="#333333", linewidth=0.8, label="US graders"),
        dict(color=colours, edgecolor="#333333", linewidth=0.8, hatch="///", label="India graders"),
        title=f"Monk skin tone by grader pool (n = {n_cases:,} cases)",
        xlabel="Monk skin tone (1 lightest .. 10 deepest), estimated by lay graders",
    )


def _plot_fitzpatrick(representation: pd.DataFrame, n_cases: int, path: Path) -> Path:
    self_reported = _attribute(representation, "fst_self_reported").set_index("group")["n_cases"]
    dermatologist = _attribute(representation, "fst_dermatologist").set_index("group")["n_cases"]
    groups = list(
        dict.fromkeys(
            [g for g in self_reported.index if g != MISSING_GROUP]
            + [g for g in dermatologist.index if g != MISSING_GROUP]
            + [MISSING_GROUP]
        )
    )
    return _paired_bar_chart(
        path,
        [g.replace("_", " ") for g in groups],
        self_reported.reindex(groups, fill_value=0),
        dermatologist.reindex(groups, fill_value=0),
        dict(color="#4c72b0", label="self-reported"),
        dict(color="#dd8452", label="dermatologist (grader 1)"),
        title=f"Fitzpatrick skin type: self-reported vs dermatologist (n = {n_cases:,} cases)",
    )


def _plot_race(representation: pd.DataFrame, n_cases: int, path: Path) -> Path:
    race = _attribute(representation, RACE_ATTRIBUTE)
    figure = _new_figure(10, 5.5)
    ax = figure.add_subplot()
    y = np.arange(len(race))
    bars = ax.barh(y, race["n_cases"], color="#55a868")
    ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(
        y,
        [g.replace("_", " ").lower() if g != MISSING_GROUP else "missing (no box ticked)" for g in race["group"]],
        fontsize=9,
    )
    ax.invert_yaxis()  # first group on top, as in the table
    ax.set_xlabel("cases (multi-select: a case counts in every group it ticked)")
    ax.set_title(f"Race/ethnicity, self-reported (n = {n_cases:,} cases)")
    ax.margins(x=0.1)
    return _save(figure, path)


def _plot_sex_and_age(representation: pd.DataFrame, n_cases: int, path: Path) -> Path:
    figure = _new_figure(12, 5)
    figure.suptitle(f"Sex at birth and age group, self-reported (n = {n_cases:,} cases)")
    for position, (attribute, colour, title) in enumerate(
        [("sex_at_birth", "#8172b3", "Sex at birth"), ("age_group", "#937860", "Age group")], start=1
    ):
        rows = _attribute(representation, attribute)
        ax = figure.add_subplot(1, 2, position)
        y = np.arange(len(rows))
        bars = ax.barh(y, rows["n_cases"], color=colour)
        ax.bar_label(bars, fontsize=8, padding=2)
        ax.set_yticks(y, [g.removeprefix("AGE_").replace("_", " ").lower() for g in rows["group"]], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel("cases")
        ax.set_title(title)
        ax.margins(x=0.15)
    return _save(figure, path)


def _plot_top_conditions(conditions: pd.DataFrame, n_labelled: int, path: Path) -> Path:
    top = conditions.head(TOP_CONDITIONS_PLOTTED)
    figure = _new_figure(11, 9)
    ax = figure.add_subplot()
    if top.empty:
        _no_data(ax, "no labelled case")
    else:
        y = np.arange(len(top))
        height = 0.4
        bars_top = ax.barh(y - height / 2, top["n_top_weighted"], height, color="#c44e52", label="top-weighted label")
        bars_any = ax.barh(
            y + height / 2, top["n_any_mention"], height, color="#8da0cb", label="mentioned in any weighted label"
        )
        for bars in (bars_top, bars_any):
            ax.bar_label(bars, fontsize=7, padding=2)
        ax.set_yticks(y, top["condition"], fontsize=9)
        ax.invert_yaxis()
        ax.legend(loc="lower right")
        ax.margins(x=0.1)
    ax.set_xlabel("cases")
    ax.set_title(
        f"Top {min(TOP_CONDITIONS_PLOTTED, len(conditions))} of {len(conditions)} conditions "
        f"(n = {n_labelled:,} labelled cases)"
    )
    return _save(figure, path)


def _plot_label_coverage(label_coverage: pd.DataFrame, n_cases: int, path: Path) -> Path:
    figure = _new_figure(12, 4.5)
    figure.suptitle(f"Label coverage (n = {n_cases:,} cases)")
    panels = [
        ("label_status", "Label status", "#4c72b0"),
        ("n_label_graders", "Dermatologists who graded the case", "#dd8452"),
    ]
    for position, (breakdown, title, colour) in enumerate(panels, start=1):
        rows = label_coverage[label_coverage["breakdown"] == breakdown]
        ax = figure.add_subplot(1, 2, position)
        y = np.arange(len(rows))
        bars = ax.barh(y, rows["n_cases"], color=colour)
        ax.bar_label(
            bars,
            labels=[f"{n:,} ({s:.0%})" if pd.notna(s) else f"{n:,}" for n, s in zip(rows["n_cases"], rows["share"])],
            fontsize=8,
            padding=2,
        )
        labels = rows["group"].str.replace("_", " ")
        if breakdown == "n_label_graders":
            labels = [f"{g} dermatologist{'s' if g != '1' else ''}" for g in rows["group"]]
        ax.set_yticks(y, labels, fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel("cases")
        ax.set_title(title)
        ax.margins(x=0.25)
    return _save(figure, path)


def _plot_missingness(missingness: pd.DataFrame, path: Path) -> Path:
    top = missingness[missingness["n_missing"] > 0].head(TOP_MISSING_COLUMNS_PLOTTED)
    figure = _new_figure(11, 9)
    ax = figure.add_subplot()
    if top.empty:
        _no_data(ax, "no missing values in any column")
    else:
        y = np.arange(len(top))
        bars = ax.barh(y, top["share_missing"], color="#7f7f7f")
        ax.bar_label(bars, labels=[format_cell(s) for s in top["share_missing"]], fontsize=7, padding=2)
        ax.set_yticks(y, top["table"] + "." + top["column"], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.1)
    ax.set_xlabel("share of rows missing (None/NaN; empty lists and unticked boxes are not missing)")
    rows_per_table = missingness.groupby("table")["n_rows"].first()  # sorted: cases, then images
    sizes = ", ".join(f"{table}: n = {n:,} rows" for table, n in rows_per_table.items())
    ax.set_title(f"Columns with missing values: the {len(top)} most missing of {len(missingness)} columns\n({sizes})")
    return _save(figure, path)


# ------------------------------------------------------------------------------------------- markdown


def _image_link(name: str) -> str:
    return f"![{name}]({name}.png)"


def _headline_lines(meta: dict, n_cases: int, n_labelled: int) -> list[str]:
    return [
        f"- cases: {n_cases:,}",
        f"- labelled cases (at least one dermatologist condition label): {n_labelled:,}"
        + (f" ({n_labelled / n_cases:.1%})" if n_cases else ""),
        f"- image references: {meta['n_image_refs']:,}; distinct files: {meta['n_distinct_files']:,}; "
        f"files shared by several references: {meta['n_shared_files']:,} "
        f"({meta['n_refs_to_shared']:,} references)",
        f"- cases with Monk skin tone 7-10 (US graders): {meta['n_mst_7_10']:,}"
        + (f" ({meta['share_mst_7_10']:.1%} of all cases)" if n_cases else "")
        + ": per-group metrics there need confidence intervals",
        f"- distinct top-weighted conditions: {meta['n_conditions_top']:,}; distinct condition names in "
        f"any weighted label: {meta['n_conditions_any']:,}",
    ]


def _headline_markdown(report: DataReport, n_cases: int, n_labelled: int, *, synthetic: bool) -> str:
    lines = [SYNTHETIC_BANNER, ""] if synthetic else []
    lines += ["**SCIN data report: headline numbers**", ""]
    lines += _headline_lines(report.summary_metadata, n_cases, n_labelled)
    return "\n".join(lines)


def _build_markdown(
    report: DataReport, n_cases: int, n_labelled: int, *, synthetic: bool, source_uri: str, release: str
) -> str:
    # The headline numbers come right after the title: a reader (or a viewer that opens the document at
    # its top) sees them first; provenance and conventions follow.
    lines: list[str] = [SYNTHETIC_BANNER, ""] if synthetic else []
    lines += ["# SCIN data report", "", "## Headline numbers", ""]
    lines += _headline_lines(report.summary_metadata, n_cases, n_labelled)
    lines += [""]
    if synthetic:
        lines += [
            "> **The images of this run are synthetic.** The metadata counts above and below (cases, "
            "demographics, skin tones, labels) come from whatever metadata this run was given, "
            "which may be the real SCIN release; anything computed from pixels describes no real "
            "skin.",
            "",
        ]
    provenance = [f"source `{source_uri}`" if source_uri else "", f"release `{release}`" if release else ""]
    if any(provenance):
        lines += ["Metadata: " + ", ".join(p for p in provenance if p) + ".", ""]
    lines += [
        "Conventions: a missing value is shown as the group `missing`, never dropped; answers such as "
        "`AGE_UNKNOWN` or `NONE_IDENTIFIED` are answers, not missing. `share` is of all cases, "
        "`share_labelled` of the cases with at least one dermatologist condition label.",
        "",
        "## Representation",
        "",
        "`race_ethnicity` is multi-select: a case counts once in every group it ticked, so its counts are "
        "the sums of the `race_ethnicity_*` check boxes and its shares add up to more than 100%. A case "
        "that ticked no box is `missing`. Every other attribute is single-valued (shares sum to 100%).",
        "",
    ]
    plot_after = {
        "monk_skin_tone_india": "monk_skin_tone",
        "fst_dermatologist": "fitzpatrick",
        RACE_ATTRIBUTE: "race_ethnicity",
        "age_group": "sex_and_age",
    }
    columns = ["group", "n_cases", "share", "n_labelled", "share_labelled"]
    for attribute in ATTRIBUTE_ORDER:
        lines += [
            f"### {ATTRIBUTE_TITLES[attribute]} (`{attribute}`)",
            "",
            markdown_table(_attribute(report.representation, attribute)[columns]),
            "",
        ]
        if attribute in plot_after:
            lines += [_image_link(plot_after[attribute]), ""]
    shown = report.conditions.head(TOP_CONDITIONS_PLOTTED)
    lines += [
        "## Conditions",
        "",
        f"Top {len(shown)} of {len(report.conditions):,} conditions. `n_top_weighted`: cases whose "
        "highest-weighted label is the condition; `n_any_mention`: cases whose weighted labels include "
        "it; `share_top_weighted` is of labelled cases.",
        "",
        markdown_table(shown),
        "",
        _image_link("top_conditions"),
        "",
        "## Label coverage",
        "",
        "`label_status`: why a case has or lacks a label (rule in `scin_pipeline.core.metadata."
        "label_status`). `n_label_graders`: how many dermatologists graded the case, over all cases and "
        "over the labelled ones (each share is of that population).",
        "",
        markdown_table(report.label_coverage),
        "",
        _image_link("label_coverage"),
        "",
        "## Missingness",
        "",
        "Counts None/NaN only: an empty label list and an unticked check box are answers, not missing "
        "values. Columns with at least one missing value, most missing first "
        f"(top {TOP_MISSING_COLUMNS_PLOTTED}):",
        "",
    ]
    missing = report.missingness[report.missingness["n_missing"] > 0].head(TOP_MISSING_COLUMNS_PLOTTED)
    lines += [
        markdown_table(missing) if len(missing) else "No column has a missing value.",
        "",
        _image_link("missingness"),
        "",
        "## Images",
        "",
        markdown_table(report.images_summary),
        "",
    ]
    return "\n".join(lines)


def markdown_with_inline_images(report: DataReport) -> str:
    """The report's Markdown with each plot embedded as a base64 ``data:`` URI, for viewers that cannot
    reach ``out_dir`` (Dagster's ``MetadataValue.md``)."""
    markdown = report.markdown
    for name, path in report.plots.items():
        markdown = markdown.replace(f"![{name}]({Path(path).name})", f"![{name}]({png_data_uri(path)})")
    return markdown


# ------------------------------------------------------------------------------------------ the report


def build_data_report(
    cases: pd.DataFrame,
    images: pd.DataFrame,
    image_files: pd.DataFrame | None = None,
    *,
    out_dir: Path,
    synthetic: bool = False,
    source_uri: str = "",
    release: str = "",
) -> DataReport:
    """Compute every table, write the plots (``<name>.png``) and ``data_report.md`` into ``out_dir``.

    ``synthetic`` marks a run whose images are synthetic: the Markdown then opens with
    :data:`SYNTHETIC_BANNER`. The metadata counts are computed from ``cases``/``images`` as given either
    way.
    """
    _require_columns(cases, REQUIRED_CASE_COLUMNS, "cases")
    _require_columns(images, REQUIRED_IMAGE_COLUMNS, "images")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    representation = representation_table(cases)
    conditions = conditions_table(cases)
    label_coverage = label_coverage_table(cases)
    missingness = missingness_table(cases, images)
    images_summary = images_summary_table(cases, images, image_files)

    n_cases = len(cases)
    n_labelled = int(cases["has_label"].astype(bool).sum())
    tones_us = pd.to_numeric(cases["monk_skin_tone_label_us"], errors="coerce")
    n_mst_7_10 = int(tones_us.isin(DEEP_MONK_TONES).sum())
    image_metrics = images_summary.set_index("metric")["value"]
    summary: dict[str, float | int | str] = {
        "n_cases": n_cases,
        "n_labelled": n_labelled,
        "share_labelled": _share(n_labelled, n_cases),
        "n_image_refs": int(image_metrics["n_image_refs"]),
        "n_distinct_files": int(image_metrics["n_distinct_files"]),
        "n_shared_files": int(image_metrics["n_shared_files"]),
        "n_refs_to_shared": int(image_metrics["n_refs_to_shared"]),
        "n_rejected_paths": int(image_metrics["n_rejected_paths"]),
        "n_mst_7_10": n_mst_7_10,
        # Of all cases (those without a US tone included), like every `share` in the representation.
        "share_mst_7_10": _share(n_mst_7_10, n_cases),
        "n_conditions_top": int(conditions["n_top_weighted"].gt(0).sum()),
        "n_conditions_any": int(conditions["n_any_mention"].gt(0).sum()),
        "synthetic": "yes" if synthetic else "no",
        "source_uri": source_uri,
        "release": release,
    }
    if image_files is not None:
        for status in IMAGE_FILE_STATUSES:
            summary[f"n_files_{status}"] = int(image_metrics[f"n_files_{status}"])

    report = DataReport(
        representation=representation,
        conditions=conditions,
        label_coverage=label_coverage,
        missingness=missingness,
        images_summary=images_summary,
        summary_metadata=summary,
    )
    report.plots = {
        "monk_skin_tone": _plot_monk(representation, n_cases, out_dir / "monk_skin_tone.png"),
        "fitzpatrick": _plot_fitzpatrick(representation, n_cases, out_dir / "fitzpatrick.png"),
        "race_ethnicity": _plot_race(representation, n_cases, out_dir / "race_ethnicity.png"),
        "sex_and_age": _plot_sex_and_age(representation, n_cases, out_dir / "sex_and_age.png"),
        "top_conditions": _plot_top_conditions(conditions, n_labelled, out_dir / "top_conditions.png"),
        "label_coverage": _plot_label_coverage(label_coverage, n_cases, out_dir / "label_coverage.png"),
        "missingness": _plot_missingness(missingness, out_dir / "missingness.png"),
    }
    report.markdown = _build_markdown(
        report, n_cases, n_labelled, synthetic=synthetic, source_uri=source_uri, release=release
    )
    report.headline = _headline_markdown(report, n_cases, n_labelled, synthetic=synthetic)
    write_text_atomic(report.markdown, out_dir / REPORT_MARKDOWN_FILE)
    return report
