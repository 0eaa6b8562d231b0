"""The data report: exact numbers on a hand-made five-case frame, the checked facts of the real release,
and the files it writes (valid, small PNGs; Markdown that links every plot)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from PIL import Image

from scin_pipeline.core import schema
from scin_pipeline.core.report import (
    PLOT_NAMES,
    REPORT_MARKDOWN_FILE,
    SYNTHETIC_BANNER,
    build_data_report,
    markdown_with_inline_images,
    representation_table,
    split_report,
)
from scin_pipeline.core.schema import MISSING_GROUP

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 150_000

# ------------------------------------------------------------------------------ hand-made five cases

# c3 has no US tone (shown as "missing"), no race box ticked and no labels; c5 has no age answer.
CASE_ROWS = [
    # case_id, tone_us, tone_india, fst_self, fst_derm, race boxes ticked, combined_race, sex, age,
    # weighted labels, label_status, n_label_graders
    ("c1", 1, 2, "FST1", "FST2", ["white"], "WHITE", "FEMALE", "AGE_18_TO_29", ["Eczema", "Psoriasis"], "labelled", 3),
    (
        "c2",
        7,
        7,
        "FST6",
        "FST6",
        ["black_or_african_american", "hispanic_latino_or_spanish_origin"],
        "BLACK_OR_AFRICAN_AMERICAN,HISPANIC_LATINO_OR_SPANISH_ORIGIN",
        "MALE",
        "AGE_30_TO_39",
        ["Psoriasis", "Eczema"],
        "labelled",
        1,
    ),
    ("c3", None, 3, None, None, [], None, "OTHER_OR_UNSPECIFIED", "AGE_UNKNOWN", [], "ungradable", 1),
    (
        "c4",
        10,
        None,
        "NONE_IDENTIFIED",
        "FST5",
        ["asian"],
        "ASIAN",
        "FEMALE",
        "AGE_80_OR_ABOVE",
        ["Eczema"],
        "labelled",
        1,
    ),
    ("c5", 2, 2, "FST3", "FST3", ["white"], "WHITE", "FEMALE", None, [], "no_pathology", 3),
]


def hand_made_cases() -> pd.DataFrame:
    rows = []
    for (
        case_id,
        tone_us,
        tone_india,
        fst_self,
        fst_derm,
        races,
        combined,
        sex,
        age,
        weighted,
        status,
        graders,
    ) in CASE_ROWS:
        row = {
            "case_id": case_id,
            "monk_skin_tone_label_us": tone_us,
            "monk_skin_tone_label_india": tone_india,
            "fitzpatrick_skin_type": fst_self,
            "fst_dermatologist": fst_derm,
            "combined_race": combined,
            "sex_at_birth": sex,
            "age_group": age,
            "weighted_label_names": weighted,
            "top_label": weighted[0] if weighted else None,
            "has_label": bool(weighted),
            "label_status": status,
            "n_label_graders": graders,
        }
        for column in schema.RACE_COLUMNS:
            row[column] = column.removeprefix("race_ethnicity_") in races
        rows.append(row)
    cases = pd.DataFrame(rows)
    for column in ("monk_skin_tone_label_us", "monk_skin_tone_label_india"):
        cases[column] = cases[column].astype("Int8")
    return cases


def hand_made_images() -> pd.DataFrame:
    # c1 has 3 references, c2 1, c3 2 (one with a rejected path), c4 1 that reuses c1's first file, c5 none.
    rows = [
        ("c1", "dataset/images/1.png", "CLOSE_UP", "ok"),
        ("c1", "dataset/images/2.png", "AT_AN_ANGLE", "ok"),
        ("c1", "dataset/images/3.png", None, "ok"),
        ("c2", "dataset/images/4.png", "CLOSE_UP", "ok"),
        ("c3", "dataset/images/5.png", "CLOSE_UP", "ok"),
        ("c3", "../../etc/passwd", "AT_DISTANCE", "rejected"),
        ("c4", "dataset/images/1.png", "CLOSE_UP", "ok"),
    ]
    return pd.DataFrame(rows, columns=["case_id", "object_path", "shot_type", "path_status"])


def hand_made_image_files() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_id": ["1", "2", "3", "4", "5"],
            "object_path": [f"dataset/images/{i}.png" for i in range(1, 6)],
            "local_path": [f"/x/{i}.png" for i in range(1, 6)],
            "bytes": [100, 200, None, 50, None],
            "status": ["ok", "ok", "missing", "corrupt", "rejected"],
            "reason": [None, None, "404", "truncated", "unsafe path"],
        }
    )


def counts(representation: pd.DataFrame, attribute: str, column: str = "n_cases") -> dict[str, int]:
    rows = representation[representation["attribute"] == attribute]
    return dict(zip(rows["group"], rows[column].astype(int)))


@pytest.fixture(scope="module")
def small_report(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("small_report")
    return build_data_report(
        hand_made_cases(),
        hand_made_images(),
        hand_made_image_files(),
        out_dir=out_dir,
        synthetic=True,
        source_uri="file:///fixture",
        release="test",
    )


def test_missing_tone_is_its_own_group_and_every_tone_is_listed_in_order():
    representation = representation_table(hand_made_cases())
    us = representation[representation["attribute"] == "monk_skin_tone_us"]
    assert us["group"].tolist() == [str(t) for t in range(1, 11)] + [MISSING_GROUP]
    assert counts(representation, "monk_skin_tone_us") == {
        "1": 1,
        "2": 1,
        "3": 0,
        "4": 0,
        "5": 0,
        "6": 0,
        "7": 1,
        "8": 0,
        "9": 0,
        "10": 1,
        MISSING_GROUP: 1,
    }
    assert us["share"].tolist() == pytest.approx([0.2, 0.2, 0, 0, 0, 0, 0.2, 0, 0, 0.2, 0.2])
    # Labelled cases are c1 (tone 1), c2 (tone 7), c4 (tone 10).
    assert counts(representation, "monk_skin_tone_us", "n_labelled") == {
        "1": 1,
        "2": 0,
        "3": 0,
        "4": 0,
        "5": 0,
        "6": 0,
        "7": 1,
        "8": 0,
        "9": 0,
        "10": 1,
        MISSING_GROUP: 0,
    }
    assert us["share_labelled"].tolist() == pytest.approx([1 / 3, 0, 0, 0, 0, 0, 1 / 3, 0, 0, 1 / 3, 0])
    assert counts(representation, "monk_skin_tone_india")[MISSING_GROUP] == 1
    assert counts(representation, "monk_skin_tone_india")["2"] == 2


def test_hand_made_categorical_attributes_in_natural_order():
    representation = representation_table(hand_made_cases())
    assert counts(representation, "fst_self_reported") == {
        "FST1": 1,
        "FST2": 0,
        "FST3": 1,
        "FST4": 0,
        "FST5": 0,
        "FST6": 1,
        "NONE_IDENTIFIED": 1,
        MISSING_GROUP: 1,
    }
    assert counts(representation, "fst_dermatologist") == {
        "FST1": 0,
        "FST2": 1,
        "FST3": 1,
        "FST4": 0,
        "FST5": 1,
        "FST6": 1,
        MISSING_GROUP: 1,
    }
    age = representation[representation["attribute"] == "age_group"]
    assert age["group"].tolist() == schema.ENUM_VALUES["age_group"] + [MISSING_GROUP]
    assert counts(representation, "age_group") == {
        "AGE_18_TO_29": 1,
        "AGE_30_TO_39": 1,
        "AGE_40_TO_49": 0,
        "AGE_50_TO_59": 0,
        "AGE_60_TO_69": 0,
        "AGE_70_TO_79": 0,
        "AGE_80_OR_ABOVE": 1,
        "AGE_UNKNOWN": 1,
        MISSING_GROUP: 1,
    }
    assert counts(representation, "sex_at_birth") == {
        "FEMALE": 3,
        "MALE": 1,
        "INTERSEX_OR_NON_BINARY": 0,
        "OTHER_OR_UNSPECIFIED": 1,
        MISSING_GROUP: 0,
    }
    # No vocabulary: most frequent first, ties by name, missing last.
    combined = representation[representation["attribute"] == "combined_race"]
    assert combined["group"].tolist() == [
        "WHITE",
        "ASIAN",
        "BLACK_OR_AFRICAN_AMERICAN,HISPANIC_LATINO_OR_SPANISH_ORIGIN",
        MISSING_GROUP,
    ]
    assert combined["n_cases"].tolist() == [2, 1, 1, 1]


def test_race_is_multi_select_and_counts_every_ticked_box():
    representation = representation_table(hand_made_cases())
    race = counts(representation, "race_ethnicity")
    assert race == {
        "AMERICAN_INDIAN_OR_ALASKA_NATIVE": 0,
        "ASIAN": 1,
        "BLACK_OR_AFRICAN_AMERICAN": 1,
        "HISPANIC_LATINO_OR_SPANISH_ORIGIN": 1,
        "MIDDLE_EASTERN_OR_NORTH_AFRICAN": 0,
        "NATIVE_HAWAIIAN_OR_PACIFIC_ISLANDER": 0,
        "WHITE": 2,
        "OTHER_RACE": 0,
        "PREFER_NOT_TO_ANSWER": 0,
        "TWO_OR_MORE_AFTER_MITIGATION": 0,
        MISSING_GROUP: 1,
    }
    rows = representation[representation["attribute"] == "race_ethnicity"]
    assert rows["multi_select"].all()
    assert rows["share"].sum() == pytest.approx(6 / 5)  # c2 ticked two boxes
    assert not representation.loc[representation["attribute"] != "race_ethnicity", "multi_select"].any()


def test_representation_of_a_subset_is_that_subsets_composition():
    # The same function on a split's cases: the labelled subset's shares are the whole's share_labelled.
    cases = hand_made_cases()
    whole = representation_table(cases)
    labelled_only = representation_table(cases[cases["has_label"]])
    assert labelled_only["n_cases"].tolist() == whole["n_labelled"].tolist()
    assert labelled_only["share"].to_numpy() == pytest.approx(whole["share_labelled"].to_numpy())


def test_split_report_composition_of_each_split_and_of_the_whole():
    # c1 (2 images) and c2 in train, c4 in test, c5 in val; c3 is not in any split.
    table = pd.DataFrame(
        {
            "image_id": ["1", "2", "4", "6", "7"],
            "case_id": ["c1", "c1", "c2", "c4", "c5"],
            "split": pd.Categorical(["train", "train", "train", "test", "val"], categories=["train", "val", "test"]),
            "label": ["Eczema", "Eczema", "Psoriasis", "Eczema", "other"],
        }
    )
    report = split_report(table, hand_made_cases())
    assert list(report.columns) == ["split", "attribute", "group", "n_cases", "share"]
    assert list(dict.fromkeys(report["split"])) == ["all", "train", "val", "test"]
    assert set(report["attribute"]) == {"label", "monk_skin_tone_us", "fst_dermatologist", "fst_self_reported"}

    def rows(split, attribute):
        part = report[(report["split"] == split) & (report["attribute"] == attribute)]
        return {g: (int(n), round(float(s), 3)) for g, n, s in zip(part["group"], part["n_cases"], part["share"]) if n}

    # Labels count cases, not images: c1's two images are one case.
    assert rows("all", "label") == {"Eczema": (2, 0.5), "Psoriasis": (1, 0.25), "other": (1, 0.25)}
    assert rows("train", "label") == {"Eczema": (1, 0.5), "Psoriasis": (1, 0.5)}
    assert rows("all", "monk_skin_tone_us") == {"1": (1, 0.25), "7": (1, 0.25), "10": (1, 0.25), "2": (1, 0.25)}
    assert rows("test", "fst_dermatologist") == {"FST5": (1, 1.0)}
    assert rows("val", "fst_self_reported") == {"FST3": (1, 1.0)}
    # Every Monk tone is listed per split, zeros included (a zero is information).
    assert len(report[(report["split"] == "val") & (report["attribute"] == "monk_skin_tone_us")]) == 11


def test_hand_made_conditions_and_label_coverage(small_report):
    conditions = small_report.conditions
    assert conditions[["rank", "condition", "n_top_weighted", "n_any_mention"]].values.tolist() == [
        [1, "Eczema", 2, 3],
        [2, "Psoriasis", 1, 2],
    ]
    assert conditions["share_top_weighted"].tolist() == pytest.approx([2 / 3, 1 / 3])

    coverage = small_report.label_coverage
    by_key = {(b, g): (n, s) for b, g, n, s in coverage.itertuples(index=False)}
    assert by_key[("label_status", "labelled")] == (3, pytest.approx(0.6))
    assert by_key[("label_status", "ungradable")] == (1, pytest.approx(0.2))
    assert by_key[("label_status", "no_pathology")] == (1, pytest.approx(0.2))
    assert by_key[("label_status", "gradable_unlabelled")][0] == 0
    assert by_key[("n_label_graders", "1")] == (3, pytest.approx(0.6))
    assert by_key[("n_label_graders", "3")] == (2, pytest.approx(0.4))
    assert by_key[("n_label_graders_among_labelled", "1")] == (2, pytest.approx(2 / 3))
    assert by_key[("n_label_graders_among_labelled", "3")] == (1, pytest.approx(1 / 3))


def test_hand_made_images_summary(small_report):
    metrics = dict(zip(small_report.images_summary["metric"], small_report.images_summary["value"]))
    assert {
        k: metrics[k]
        for k in ("n_image_refs", "n_distinct_files", "n_shared_files", "n_refs_to_shared", "n_rejected_paths")
    } == {"n_image_refs": 7, "n_distinct_files": 6, "n_shared_files": 1, "n_refs_to_shared": 2, "n_rejected_paths": 1}
    assert [metrics[f"n_cases_with_{n}_image_refs"] for n in range(4)] == [1, 2, 1, 1]
    assert [metrics[f"n_refs_shot_{s}"] for s in ("CLOSE_UP", "AT_AN_ANGLE", "AT_DISTANCE", "missing")] == [4, 1, 1, 1]
    assert [metrics[f"n_files_{s}"] for s in ("ok", "missing", "corrupt", "rejected")] == [2, 1, 1, 1]
    assert metrics["n_bytes_ok"] == 300
    assert small_report.summary_metadata["n_files_ok"] == 2


def test_images_summary_without_image_files_has_no_file_rows(tmp_path):
    report = build_data_report(hand_made_cases(), hand_made_images(), None, out_dir=tmp_path)
    assert not report.images_summary["metric"].str.startswith("n_files_").any()
    assert "n_files_ok" not in report.summary_metadata


def test_missingness_counts_none_and_nan_but_not_empty_lists(small_report):
    missing = small_report.missingness.set_index(["table", "column"])
    assert missing.loc[("cases", "monk_skin_tone_label_us"), "n_missing"] == 1
    assert missing.loc[("cases", "top_label"), "n_missing"] == 2
    assert missing.loc[("cases", "top_label"), "share_missing"] == pytest.approx(0.4)
    # c3 and c5 have an empty weighted-label list: an answer ("no label"), not a missing value.
    assert missing.loc[("cases", "weighted_label_names"), "n_missing"] == 0
    assert missing.loc[("cases", "race_ethnicity_white"), "n_missing"] == 0
    assert missing.loc[("images", "shot_type"), "n_missing"] == 1
    assert missing["share_missing"].is_monotonic_decreasing


def test_summary_metadata_headline_numbers(small_report):
    summary = small_report.summary_metadata
    assert summary["n_cases"] == 5
    assert summary["n_labelled"] == 3
    assert summary["n_image_refs"] == 7
    assert summary["n_distinct_files"] == 6
    assert summary["n_mst_7_10"] == 2  # c2 (tone 7) and c4 (tone 10)
    assert summary["share_mst_7_10"] == pytest.approx(0.4)
    assert summary["n_conditions_top"] == 2
    assert summary["synthetic"] == "yes"
    assert all(isinstance(v, (int, float, str)) for v in summary.values())


def assert_valid_small_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) < MAX_PNG_BYTES, f"{path.name} is {len(data):,} bytes"
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= 300 and pixels.shape[1] >= 600, pixels.shape
    # Not a blank canvas: something was drawn.
    assert len(np.unique(pixels[..., 0])) > 10


def test_every_plot_is_written_as_a_valid_small_png(small_report, tmp_path):
    assert set(small_report.plots) == set(PLOT_NAMES)
    for name, path in small_report.plots.items():
        assert path.name == f"{name}.png"
        assert_valid_small_png(path)


def test_markdown_is_written_links_every_plot_and_opens_with_the_synthetic_banner(small_report):
    markdown = small_report.markdown
    assert markdown.splitlines()[0] == SYNTHETIC_BANNER
    assert SYNTHETIC_BANNER.startswith("SYNTHETIC DATA: images in this run are synthetic")
    for name, path in small_report.plots.items():
        assert f"![{name}]({path.name})" in markdown
    assert "multi-select" in markdown
    written = small_report.plots["monk_skin_tone"].parent / REPORT_MARKDOWN_FILE
    assert written.read_text(encoding="utf-8") == markdown


def test_the_report_opens_at_its_headline_numbers(small_report):
    from scin_pipeline.assets.report import DAGSTER_INLINE_MARKDOWN_CHARS

    lines = [line for line in small_report.markdown.splitlines() if line]
    # Banner, title, then the headline numbers before anything else (provenance, conventions, tables).
    assert lines[:3] == [SYNTHETIC_BANNER, "# SCIN data report", "## Headline numbers"]
    assert lines[3] == "- cases: 5"
    assert small_report.markdown.index("## Headline numbers") < small_report.markdown.index("Conventions:")
    # The headline alone, banner first, short enough for Dagster to show in place (no dialog).
    headline = small_report.headline
    assert headline.splitlines()[0] == SYNTHETIC_BANNER and "- cases: 5" in headline
    assert "- labelled cases" in headline and "Monk skin tone 7-10" in headline
    assert len(headline) < DAGSTER_INLINE_MARKDOWN_CHARS


def test_markdown_without_synthetic_has_no_banner(tmp_path):
    report = build_data_report(hand_made_cases(), hand_made_images(), out_dir=tmp_path)
    assert "SYNTHETIC DATA" not in report.markdown
    assert report.markdown.startswith("# SCIN data report")
    assert report.summary_metadata["synthetic"] == "no"


def test_inline_markdown_embeds_each_plot_as_its_png_bytes(small_report):
    inline = markdown_with_inline_images(small_report)
    embedded = dict(re.findall(r"!\[(\w+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inline))
    assert set(embedded) == set(PLOT_NAMES)
    for name, encoded in embedded.items():
        assert base64.b64decode(encoded) == small_report.plots[name].read_bytes()
    assert not re.search(r"\]\(\w+\.png\)", inline)  # no link left pointing at a local file


def test_same_inputs_give_the_same_report(tmp_path):
    first = build_data_report(hand_made_cases(), hand_made_images(), out_dir=tmp_path / "a")
    second = build_data_report(hand_made_cases(), hand_made_images(), out_dir=tmp_path / "b")
    assert first.markdown == second.markdown
    for name in PLOT_NAMES:
        assert first.plots[name].read_bytes() == second.plots[name].read_bytes(), name


def test_cases_without_a_needed_column_are_refused_by_name(tmp_path):
    cases = hand_made_cases().drop(columns=["monk_skin_tone_label_india"])
    with pytest.raises(ValueError, match="monk_skin_tone_label_india"):
        build_data_report(cases, hand_made_images(), out_dir=tmp_path)


def test_no_cases_gives_nan_shares_not_a_crash(tmp_path):
    cases = hand_made_cases().iloc[0:0]
    images = hand_made_images().iloc[0:0]
    report = build_data_report(cases, images, out_dir=tmp_path)
    assert report.representation["n_cases"].eq(0).all()
    assert report.representation["share"].isna().all()
    for path in report.plots.values():
        assert path.read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------------------- the real SCIN metadata


@pytest.fixture(scope="module")
def real_report(real_parsed_metadata, tmp_path_factory):
    return build_data_report(
        real_parsed_metadata.cases,
        real_parsed_metadata.images,
        out_dir=tmp_path_factory.mktemp("real_report"),
        synthetic=True,
    )


@pytest.mark.real_metadata
def test_real_monk_and_dermatologist_fst_counts_match_the_checked_facts(real_report):
    representation = real_report.representation
    assert counts(representation, "monk_skin_tone_us") == {
        "1": 577,
        "2": 1660,
        "3": 1265,
        "4": 687,
        "5": 361,
        "6": 248,
        "7": 137,
        "8": 57,
        "9": 11,
        "10": 2,
        MISSING_GROUP: 28,
    }
    assert counts(representation, "fst_dermatologist") == {
        "FST1": 391,
        "FST2": 1432,
        "FST3": 1332,
        "FST4": 719,
        "FST5": 359,
        "FST6": 69,
        MISSING_GROUP: 731,
    }
    assert real_report.summary_metadata["n_mst_7_10"] == 137 + 57 + 11 + 2


@pytest.mark.real_metadata
def test_real_single_valued_attributes_cover_every_case_once(real_report):
    representation = real_report.representation
    single = representation[~representation["multi_select"]]
    totals = single.groupby("attribute")[["n_cases", "share", "n_labelled", "share_labelled"]].sum()
    assert len(totals) == 7
    assert (totals["n_cases"] == 5033).all()
    assert (totals["n_labelled"] == 3061).all()
    assert totals["share"].to_numpy() == pytest.approx(np.ones(7))
    assert totals["share_labelled"].to_numpy() == pytest.approx(np.ones(7))


@pytest.mark.real_metadata
def test_real_race_counts_are_the_sums_of_the_check_boxes(real_report, real_parsed_metadata):
    cases = real_parsed_metadata.cases
    race = counts(real_report.representation, "race_ethnicity")
    for column in schema.RACE_COLUMNS:
        assert race[column.removeprefix("race_ethnicity_").upper()] == int(cases[column].sum()), column
    assert race[MISSING_GROUP] == int((~cases[schema.RACE_COLUMNS].any(axis=1)).sum())
    assert sum(race.values()) > len(cases)  # some contributors ticked several boxes


@pytest.mark.real_metadata
def test_real_conditions_and_label_coverage_match_the_checked_facts(real_report):
    conditions = real_report.conditions
    top = dict(zip(conditions["condition"], conditions["n_top_weighted"]))
    assert {
        k: top[k]
        for k in (
            "Eczema",
            "Allergic Contact Dermatitis",
            "Urticaria",
            "Insect Bite",
            "Folliculitis",
            "Psoriasis",
            "Tinea",
            "Impetigo",
            "Herpes Zoster",
        )
    } == {
        "Eczema": 488,
        "Allergic Contact Dermatitis": 270,
        "Urticaria": 214,
        "Insect Bite": 185,
        "Folliculitis": 142,
        "Psoriasis": 109,
        "Tinea": 93,
        "Impetigo": 69,
        "Herpes Zoster": 68,
    }
    assert conditions["condition"].head(3).tolist() == ["Eczema", "Allergic Contact Dermatitis", "Urticaria"]
    assert int(conditions["n_top_weighted"].gt(0).sum()) == 211
    assert len(conditions) == 370
    assert conditions["n_top_weighted"].sum() == 3061  # each labelled case has exactly one top label
    assert (conditions["n_any_mention"] >= conditions["n_top_weighted"]).all()

    coverage = real_report.label_coverage.set_index(["breakdown", "group"])["n_cases"]
    assert coverage[("label_status", "labelled")] == 3061
    assert coverage["label_status"].sum() == 5033
    assert coverage[("n_label_graders", "3")] == 716
    assert coverage[("n_label_graders", "1")] == 5033 - 716
    summary = real_report.summary_metadata
    assert (summary["n_cases"], summary["n_labelled"], summary["n_conditions_top"], summary["n_conditions_any"]) == (
        5033,
        3061,
        211,
        370,
    )


@pytest.mark.real_metadata
def test_real_image_reference_counts_match_the_checked_facts(real_report):
    metrics = dict(zip(real_report.images_summary["metric"], real_report.images_summary["value"]))
    assert (
        metrics["n_image_refs"],
        metrics["n_distinct_files"],
        metrics["n_shared_files"],
        metrics["n_refs_to_shared"],
    ) == (10407, 10380, 15, 42)


@pytest.mark.real_metadata
def test_real_report_files(real_report):
    for path in real_report.plots.values():
        assert_valid_small_png(path)
    markdown = real_report.markdown
    assert markdown.startswith(SYNTHETIC_BANNER)
    assert all(f"({name}.png)" in markdown for name in PLOT_NAMES)
    assert "| 10 | 2 |" in markdown  # the two tone-10 cases appear, not rounded away
    inline = markdown_with_inline_images(real_report)
    assert inline.count("data:image/png;base64,") == len(PLOT_NAMES)
