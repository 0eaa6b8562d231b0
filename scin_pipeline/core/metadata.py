"""Parse the SCIN metadata CSVs into typed, tidy tables: ``cases`` (one row per case) and ``images``
(one row per image reference), plus a quarantine table of every row or value that could not be trusted.

Rules:
- ``case_id`` and image ids stay strings (they are signed 64-bit integers; floats would mangle them).
- Label columns are Python literals in the release; they are parsed with ``ast.literal_eval`` (never
  ``eval``) and their shape is checked. A malformed literal quarantines that value, not the case.
- A value outside a column's known vocabulary is kept (the categorical grows) and flagged.
- A file problem that makes the whole file untrustworthy (missing column, header only, not CSV) raises
  :class:`MetadataError` naming the file; a problem confined to a row quarantines that row, naming the
  file, line and reason, and the rest of the data goes on.
"""

from __future__ import annotations

import ast
import csv
import io
import re
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import pandas as pd

from scin_pipeline.core import schema
from scin_pipeline.core.paths import UnsafeObjectPath, image_id_from_path

CASES_FILE = "scin_cases.csv"
LABELS_FILE = "scin_labels.csv"

QUARANTINE_COLUMNS = ["file", "line", "case_id", "column", "action", "reason"]
# action: "row_dropped" (the row is not in the output), "value_nulled" (the row is kept, that value is
# set to missing), "flagged" (kept as is, but reported).

_INT64 = re.compile(r"-?(?:0|[1-9][0-9]{0,18})")
_SURROGATE = re.compile("[\udc80-\udcff]")


class MetadataError(ValueError):
    """A metadata file that cannot be used at all; the message names the file and what is wrong."""


@dataclass
class CsvTable:
    """A CSV read as text, every cell a string, with the file line of each row in ``line``."""

    name: str
    frame: pd.DataFrame
    issues: list[dict] = field(default_factory=list)


def read_csv_bytes(name: str, data: bytes, required_columns: list[str]) -> CsvTable:
    """Read a metadata CSV strictly as text, with clear errors for whole-file problems.

    Rows containing bytes that are not UTF-8 are quarantined (named by line), not fatal: one mangled row
    in 5,000 must not lose the other 4,999.
    """
    if not data:
        raise MetadataError(f"{name}: file is empty (0 bytes)")
    text = data.decode("utf-8-sig", errors="surrogateescape")
    if not text.strip():
        raise MetadataError(f"{name}: file holds only whitespace")
    # csv (not pandas) so that each record's first line number is known even with quoted newlines.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
        records, lines = [], []
        while True:
            start_line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if not row or all(not cell.strip() for cell in row):
                continue  # blank line
            records.append(row)
            lines.append(start_line)
    except csv.Error as exc:
        raise MetadataError(f"{name}: not a well-formed CSV near line {reader.line_num}: {exc}") from None
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        raise MetadataError(f"{name}: duplicate column name(s) in the header: {', '.join(dupes)}")
    missing = [c for c in required_columns if c not in header]
    if missing:
        raise MetadataError(
            f"{name}: missing required column(s) {', '.join(missing)} (header has {len(header)} columns)"
        )
    if not records:
        raise MetadataError(f"{name}: has a header but no data rows")

    issues: list[dict] = []
    good_rows, good_lines = [], []
    for row, line in zip(records, lines):
        if len(row) != len(header):
            issues.append(
                _issue(
                    name,
                    line,
                    row[0] if row else None,
                    None,
                    "row_dropped",
                    f"has {len(row)} fields, the header has {len(header)}",
                )
            )
            continue
        bad_cols = [header[i] for i, cell in enumerate(row) if _SURROGATE.search(cell)]
        if bad_cols:
            issues.append(
                _issue(
                    name,
                    line,
                    _clean(row[0]),
                    bad_cols[0],
                    "row_dropped",
                    f"bytes that are not UTF-8 in column(s) {', '.join(bad_cols)}",
                )
            )
            continue
        good_rows.append(row)
        good_lines.append(line)
    frame = pd.DataFrame(good_rows, columns=header, dtype=object)
    frame.insert(0, "line", np.asarray(good_lines, dtype=np.int64))
    return CsvTable(name=name, frame=frame, issues=issues)


def _clean(value: str | None) -> str | None:
    """A value safe to show in a report: undecodable bytes shown as U+FFFD."""
    return None if value is None else _SURROGATE.sub("\ufffd", value)


def _issue(file: str, line: int | None, case_id: str | None, column: str | None, action: str, reason: str) -> dict:
    return {
        "file": file,
        "line": line,
        "case_id": _clean(case_id),
        "column": column,
        "action": action,
        "reason": reason,
    }


def _dedupe_case_ids(table: CsvTable) -> pd.DataFrame:
    """Drop rows with an invalid or repeated case_id (the first occurrence wins), quarantining the rest."""
    frame = table.frame

    def drop_row(row: pd.Series, reason: str) -> None:
        table.issues.append(_issue(table.name, row["line"], row["case_id"], "case_id", "row_dropped", reason))

    frame["case_id"] = frame["case_id"].str.strip()
    valid = frame["case_id"].str.fullmatch(_INT64.pattern)
    for _, row in frame[~valid].iterrows():
        drop_row(row, "case_id is not a signed 64-bit integer")
    frame = frame[valid]
    dup = frame.duplicated("case_id", keep="first")
    if dup.any():
        first_line = frame[~dup].set_index("case_id")["line"]
        for _, row in frame[dup].iterrows():
            drop_row(row, f"duplicate case_id, first seen at line {first_line[row['case_id']]}")
    return frame[~dup].reset_index(drop=True)


def _categorical(table: CsvTable, frame: pd.DataFrame, column: str, known: list[str]) -> pd.Series:
    """Typed enum: empty -> missing; unknown values kept as extra categories and flagged."""
    values = frame[column].str.strip().replace("", None)
    unknown_mask = values.notna() & ~values.isin(known)
    for _, row in frame[unknown_mask].iterrows():
        table.issues.append(
            _issue(
                table.name,
                row["line"],
                row["case_id"],
                column,
                "flagged",
                f"unknown value {row[column].strip()!r} kept",
            )
        )
    extra = sorted(values[unknown_mask].unique().tolist())
    return pd.Series(pd.Categorical(values, categories=known + extra), index=frame.index)


def _yes_flag(frame: pd.DataFrame, column: str) -> pd.Series:
    # A check box: ticked is "YES", unticked is empty. Anything else is not a tick.
    return frame[column].str.strip().eq("YES")


def _nullable_bool(series: pd.Series) -> pd.Series:
    mapped = series.str.strip().map({"True": True, "False": False, "TRUE": True, "FALSE": False})
    return mapped.astype("boolean")


def _literal(value: str, expected: type, what: str):
    """Parse a Python literal safely and check its shape; raise ValueError with the reason."""
    text = value.strip()
    if text == "":
        return expected()
    try:
        parsed = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise ValueError(f"malformed {what} literal {text[:80]!r}: {type(exc).__name__}") from None
    if not isinstance(parsed, expected):
        raise ValueError(f"{what} is a {type(parsed).__name__}, expected a {expected.__name__}")
    return parsed


def _parse_labels(table: CsvTable, labels: pd.DataFrame) -> pd.DataFrame:
    """Parse the three label literals per row into typed columns; a malformed one nulls that case's labels."""
    out = {
        "label_names": [],
        "label_confidences": [],
        "weighted_label_names": [],
        "weighted_label_weights": [],
        "label_parse_ok": [],
    }
    for row in labels.itertuples(index=False):
        try:
            names = _literal(getattr(row, schema.LABEL_NAMES_COLUMN), list, "label name list")
            confidences = _literal(getattr(row, schema.LABEL_CONFIDENCE_COLUMN), list, "confidence list")
            weighted = _literal(getattr(row, schema.WEIGHTED_LABEL_COLUMN), dict, "weighted label dict")
            if not all(isinstance(n, str) for n in names):
                raise ValueError("label names are not all strings")
            if not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 5 for c in confidences):
                raise ValueError("confidences are not all integers 1-5")
            if len(confidences) != len(names):
                raise ValueError(f"{len(names)} label names but {len(confidences)} confidences")
            if not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
                for k, v in weighted.items()
            ):
                raise ValueError("weighted labels are not all name -> weight in [0, 1]")
        except ValueError as exc:
            table.issues.append(
                _issue(
                    table.name,
                    cast(int, row.line),
                    cast(str, row.case_id),
                    schema.WEIGHTED_LABEL_COLUMN,
                    "value_nulled",
                    f"labels not used: {exc}",
                )
            )
            for key in out:
                out[key].append(None if key != "label_parse_ok" else False)
            continue
        # Highest weight first; ties keep the release's own order (a stable sort), which is also what
        # the published top-condition counts use. 925 of 3,061 labelled cases have a tied top weight:
        # `top_label_tied` marks them so a label policy can treat them explicitly.
        ranked = sorted(weighted.items(), key=lambda kv: -float(kv[1]))
        out["label_names"].append(list(names))
        out["label_confidences"].append([int(c) for c in confidences])
        out["weighted_label_names"].append([k for k, _ in ranked])
        out["weighted_label_weights"].append([float(v) for _, v in ranked])
        out["label_parse_ok"].append(True)
    return pd.DataFrame(out, index=labels.index)


def label_status(gradability: pd.DataFrame, has_label: pd.Series, parse_ok: pd.Series) -> pd.Series:
    """Why a case has (or lacks) a condition label.

    The rule, documented because the release notes' "48 gradable but unlabelled" is not reproducible from
    any single column: a case is gradable when any dermatologist graded its images as sufficient
    (DEFAULT_YES or YES_..._NO_DISCERNIBLE_PATHOLOGY).
      labelled             at least one weighted condition label
      no_pathology         gradable, unlabelled, and a grader said no discernible pathology
      gradable_unlabelled  gradable, unlabelled, no such remark (the release notes: several conditions)
      ungradable           every grader said image quality insufficient
      no_labels_row        no row in scin_labels.csv
      malformed            the label literals could not be parsed (see the quarantine table)
    """
    graded = gradability.notna().any(axis=1)
    gradable = gradability.isin(schema.GRADABILITY_VALUES[:2]).any(axis=1)
    no_pathology = gradability.eq(schema.GRADABILITY_VALUES[1]).any(axis=1)  # pyright: ignore[reportArgumentType]  # pandas-stubs' DataFrame.eq omits str scalars
    status = np.select(
        [
            parse_ok.eq(False).to_numpy(),
            has_label.to_numpy(),
            ~graded.to_numpy(),
            (gradable & no_pathology).to_numpy(),
            gradable.to_numpy(),
        ],
        ["malformed", "labelled", "no_labels_row", "no_pathology", "gradable_unlabelled"],
        default="ungradable",
    )
    return pd.Series(
        pd.Categorical(
            status,
            categories=["labelled", "no_pathology", "gradable_unlabelled", "ungradable", "no_labels_row", "malformed"],
        ),
        index=gradability.index,
    )


@dataclass
class ParsedMetadata:
    cases: pd.DataFrame
    images: pd.DataFrame
    quarantine: pd.DataFrame


def parse_metadata(
    cases_csv: bytes,
    labels_csv: bytes,
    *,
    cases_name: str = CASES_FILE,
    labels_name: str = LABELS_FILE,
    limit_cases: int | None = None,
    sample_seed: int = 0,
) -> ParsedMetadata:
    """Parse both CSVs into ``cases``, ``images`` and ``quarantine`` tables.

    ``limit_cases`` keeps a deterministic sample of N cases (chosen by hashing case ids with
    ``sample_seed``), so a small run is reproducible and representative rather than the file's first rows.
    """
    cases_table = read_csv_bytes(cases_name, cases_csv, schema.REQUIRED_CASE_COLUMNS)
    labels_table = read_csv_bytes(labels_name, labels_csv, schema.REQUIRED_LABEL_COLUMNS)
    raw_cases = _dedupe_case_ids(cases_table)
    raw_labels = _dedupe_case_ids(labels_table)
    if raw_cases.empty:
        raise MetadataError(f"{cases_name}: no row with a usable case_id")

    if limit_cases is not None:
        if limit_cases < 1:
            raise ValueError(f"limit_cases must be at least 1, got {limit_cases}")
        order = pd.util.hash_pandas_object(raw_cases["case_id"], index=False, hash_key=f"scin{sample_seed:012d}"[:16])
        raw_cases = raw_cases.loc[order.sort_values(kind="stable").index[:limit_cases]]
        raw_cases = raw_cases.sort_values("line").reset_index(drop=True)

    # Labels rows for cases the cases file does not have: reported, not silently joined away.
    known = set(raw_cases["case_id"]) if limit_cases is None else None
    if known is not None:
        orphan = ~raw_labels["case_id"].isin(known)
        for _, row in raw_labels[orphan].iterrows():
            labels_table.issues.append(
                _issue(
                    labels_name,
                    row["line"],
                    row["case_id"],
                    "case_id",
                    "row_dropped",
                    f"references a case not in {cases_name}",
                )
            )
        raw_labels = raw_labels[~orphan]

    cases = _type_cases(cases_table, raw_cases)
    labels = _type_labels(labels_table, raw_labels)
    merged = cases.merge(labels, on="case_id", how="left", validate="one_to_one")
    merged["has_labels_row"] = merged["has_labels_row"].fillna(False).astype(bool)
    gradability = merged[schema.GRADABLE_CONDITION_COLUMNS]
    has_label = merged["weighted_label_names"].map(lambda v: isinstance(v, list) and len(v) > 0)
    merged["has_label"] = has_label.astype(bool)
    merged["label_status"] = label_status(gradability, merged["has_label"], merged["label_parse_ok"])
    merged["derm_gradable"] = gradability.isin(schema.GRADABILITY_VALUES[:2]).any(axis=1)
    merged["n_label_graders"] = gradability.notna().sum(axis=1).astype("int8")
    merged["top_label"] = (
        merged["weighted_label_names"].map(lambda v: v[0] if isinstance(v, list) and v else None).astype("string")
    )
    merged["top_label_weight"] = (
        merged["weighted_label_weights"].map(lambda v: v[0] if isinstance(v, list) and v else np.nan).astype("float64")
    )
    merged["top_label_tied"] = (
        merged["weighted_label_weights"].map(lambda v: isinstance(v, list) and len(v) > 1 and v[0] == v[1]).astype(bool)
    )

    images = _images_from_cases(cases_table, raw_cases)
    merged = merged.merge(images.groupby("case_id").size().rename("n_images"), on="case_id", how="left")
    merged["n_images"] = merged["n_images"].fillna(0).astype("int8")
    quarantine = pd.DataFrame(cases_table.issues + labels_table.issues, columns=QUARANTINE_COLUMNS)
    quarantine["line"] = quarantine["line"].astype("Int64")
    return ParsedMetadata(cases=merged, images=images, quarantine=quarantine)


def _type_cases(table: CsvTable, raw: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"case_id": raw["case_id"].astype("string")})
    out["cases_line"] = raw["line"].astype("int64")
    for column in ("source", "release"):
        out[column] = raw[column].str.strip().astype("string") if column in raw else pd.NA
    out["year"] = pd.to_numeric(raw["year"], errors="coerce").astype("Int16") if "year" in raw else pd.NA
    for column in ("age_group", "sex_at_birth", "fitzpatrick_skin_type", "related_category", "condition_duration"):
        if column in raw:
            out[column] = _categorical(table, raw, column, schema.ENUM_VALUES[column])
    for column in schema.YES_FLAG_COLUMNS:
        if column in raw:
            out[column] = _yes_flag(raw, column)
    if "combined_race" in raw:
        out["combined_race"] = raw["combined_race"].str.strip().replace("", None).astype("category")
    return out


def _type_labels(table: CsvTable, raw: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"case_id": raw["case_id"].astype("string")})
    out["labels_line"] = raw["line"].astype("Int64")
    out["has_labels_row"] = True
    for column in schema.GRADABLE_CONDITION_COLUMNS + schema.GRADABLE_FST_COLUMNS + schema.DERM_FST_COLUMNS:
        if column in raw:
            out[column] = _categorical(table, raw, column, schema.ENUM_VALUES[column])
    parsed = _parse_labels(table, raw)
    for column in parsed:
        out[column] = parsed[column]
    for grader in ("us", "india"):
        tone_col, gradable_col = f"monk_skin_tone_label_{grader}", f"gradable_for_monk_skin_tone_{grader}"
        tones = pd.to_numeric(raw[tone_col].str.strip().replace("", None), errors="coerce")
        bad = raw[tone_col].str.strip().ne("") & ~tones.isin(schema.MONK_TONES)
        for _, row in raw[bad].iterrows():
            table.issues.append(
                _issue(
                    table.name,
                    row["line"],
                    row["case_id"],
                    tone_col,
                    "value_nulled",
                    f"Monk skin tone {row[tone_col]!r} is not an integer 1-10",
                )
            )
        out[tone_col] = tones.where(~bad).astype("Int8")
        if gradable_col in raw:
            out[gradable_col] = _nullable_bool(raw[gradable_col])
    # Dermatologist-estimated Fitzpatrick type: grader 1 (every case has one; graders 2-3 only on 716).
    out["fst_dermatologist"] = out["dermatologist_fitzpatrick_skin_type_label_1"]
    return out


def _images_from_cases(table: CsvTable, raw: pd.DataFrame) -> pd.DataFrame:
    """One row per image reference. An unsafe path is kept as a row with path_status 'rejected' and its
    reason (so it is reported), and gets no image_id, so nothing downstream can open it."""
    rows = []
    for position, (path_col, shot_col) in enumerate(zip(schema.IMAGE_PATH_COLUMNS, schema.SHOT_TYPE_COLUMNS), start=1):
        for case_id, line, path, shot in zip(raw["case_id"], raw["line"], raw[path_col], raw[shot_col]):
            path = path.strip()
            if not path:
                continue
            try:
                image_id, status, reason = image_id_from_path(path), "ok", None
            except UnsafeObjectPath as exc:
                image_id, status, reason = None, "rejected", exc.reason
                table.issues.append(
                    _issue(
                        table.name,
                        line,
                        case_id,
                        path_col,
                        "value_nulled",
                        f"image path {path!r} rejected: {exc.reason}",
                    )
                )
            rows.append((image_id, case_id, position, shot.strip() or None, path, status, reason, line))
    images = pd.DataFrame(
        rows,
        columns=[
            "image_id",
            "case_id",
            "position",
            "shot_type",
            "object_path",
            "path_status",
            "path_reason",
            "cases_line",
        ],
    )
    unknown_shot = images["shot_type"].notna() & ~images["shot_type"].isin(schema.SHOT_TYPE_VALUES)
    for row in images[unknown_shot].itertuples():
        table.issues.append(
            _issue(
                table.name,
                cast(int, row.cases_line),
                cast(str, row.case_id),
                f"image_{row.position}_shot_type",
                "flagged",
                f"unknown value {row.shot_type!r} kept",
            )
        )
    extra = sorted(images.loc[unknown_shot, "shot_type"].unique().tolist())
    images["shot_type"] = pd.Categorical(images["shot_type"], categories=schema.SHOT_TYPE_VALUES + extra)
    images["image_id"] = images["image_id"].astype("string")
    images["case_id"] = images["case_id"].astype("string")
    images["position"] = images["position"].astype("int8")
    images["path_status"] = pd.Categorical(images["path_status"], categories=["ok", "rejected"])
    # How many references share the file: >1 is the release's exact reuse of one file by several cases.
    images["n_references"] = images.groupby("object_path")["object_path"].transform("size").astype("int16")
    return images.sort_values(["case_id", "position"], kind="stable").reset_index(drop=True)
