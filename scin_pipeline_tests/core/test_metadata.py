"""Parsing the SCIN CSVs: the checked facts of the real release, and every kind of bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core import schema
from scin_pipeline.core.metadata import MetadataError, parse_metadata

# A tiny, hand-made pair of files in the release's format: enough columns to exercise every rule.
CASES_HEADER = (
    "case_id,source,release,year,age_group,sex_at_birth,fitzpatrick_skin_type,"
    "race_ethnicity_white,textures_flat,image_1_path,image_2_path,image_3_path,"
    "image_1_shot_type,image_2_shot_type,image_3_shot_type"
)
LABELS_HEADER = (
    "case_id,dermatologist_gradable_for_skin_condition_1,"
    "dermatologist_gradable_for_skin_condition_2,dermatologist_gradable_for_skin_condition_3,"
    "dermatologist_skin_condition_on_label_name,dermatologist_skin_condition_confidence,"
    "weighted_skin_condition_label,dermatologist_fitzpatrick_skin_type_label_1,"
    "gradable_for_monk_skin_tone_us,monk_skin_tone_label_us,monk_skin_tone_label_india"
)
GOOD = "DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT"


def case_row(case_id, *paths, age="AGE_18_TO_29", sex="FEMALE", fst="FST3"):
    paths = list(paths) + [""] * (3 - len(paths))
    shots = ["CLOSE_UP" if p else "" for p in paths]
    return ",".join([case_id, "SCIN", "1.0.0", "2023", age, sex, fst, "YES", "", *paths, *shots])


def label_row(
    case_id,
    names="['Eczema', 'Urticaria']",
    conf="[4, 2]",
    weighted="{'Eczema': 0.67, 'Urticaria': 0.33}",
    grade=GOOD,
    tone_us="3",
):
    return ",".join([case_id, grade, "", "", f'"{names}"', f'"{conf}"', f'"{weighted}"', "FST3", "True", tone_us, "2"])


def files(case_rows, label_rows) -> tuple[bytes, bytes]:
    return ("\n".join([CASES_HEADER, *case_rows]) + "\n").encode(), (
        "\n".join([LABELS_HEADER, *label_rows]) + "\n"
    ).encode()


def parse(case_rows, label_rows, **kwargs):
    cases_csv, labels_csv = files(case_rows, label_rows)
    return parse_metadata(cases_csv, labels_csv, **kwargs)


def test_small_files_give_typed_tables():
    parsed = parse(
        [case_row("-11", "dataset/images/-5.png", "dataset/images/7.png"), case_row("22", "dataset/images/8.png")],
        [label_row("-11"), label_row("22", "[]", "[]", "{}", grade="NO_IMAGE_QUALITY_INSUFFICIENT")],
    )
    cases = parsed.cases.set_index("case_id")
    assert list(cases.index) == ["-11", "22"]
    assert cases.index.dtype == "string"
    assert cases.loc["-11", "top_label"] == "Eczema"
    assert cases.loc["-11", "weighted_label_weights"] == [0.67, 0.33]
    assert cases.loc["-11", "label_confidences"] == [4, 2]
    assert cases.loc["-11", "label_status"] == "labelled"
    assert cases.loc["22", "label_status"] == "ungradable"
    assert not cases.loc["22", "has_label"]
    assert cases.loc["-11", "monk_skin_tone_label_us"] == 3
    assert isinstance(cases["age_group"].dtype, pd.CategoricalDtype)
    assert bool(cases.loc["-11", "race_ethnicity_white"]) is True
    assert bool(cases.loc["-11", "textures_flat"]) is False
    assert cases.loc["-11", "n_images"] == 2
    images = parsed.images
    assert list(images.columns[:5]) == ["image_id", "case_id", "position", "shot_type", "object_path"]
    assert images["image_id"].tolist() == ["-5", "7", "8"]
    assert parsed.quarantine.empty


def test_path_traversal_is_rejected_reported_and_gets_no_image_id():
    parsed = parse(
        [case_row("1", "dataset/images/../../etc/passwd", "/etc/shadow", "dataset/images/3.png")], [label_row("1")]
    )
    images = parsed.images.set_index("position")
    assert images.loc[1, "path_status"] == "rejected" and pd.isna(images.loc[1, "image_id"])
    assert "traversal" in images.loc[1, "path_reason"]
    assert images.loc[2, "path_status"] == "rejected" and "absolute" in images.loc[2, "path_reason"]
    assert images.loc[3, "path_status"] == "ok"
    q = parsed.quarantine
    assert set(q["column"]) == {"image_1_path", "image_2_path"}
    assert (q["line"] == 2).all() and (q["file"] == "scin_cases.csv").all()


def test_malformed_label_literal_quarantines_the_value_not_the_case():
    parsed = parse(
        [case_row("1", "dataset/images/1.png"), case_row("2", "dataset/images/2.png")],
        [
            label_row("1", weighted="{'Eczema': 0.5"),  # unbalanced brace
            label_row("2", weighted="__import__('os').system('echo pwned')"),
        ],
    )
    cases = parsed.cases.set_index("case_id")
    assert len(cases) == 2
    assert (cases["label_status"] == "malformed").all()
    assert cases["top_label"].isna().all()
    q = parsed.quarantine
    assert q["line"].tolist() == [2, 3]
    assert q["case_id"].tolist() == ["1", "2"]
    assert (q["action"] == "value_nulled").all()
    assert q["reason"].str.contains("malformed weighted label dict literal").all()


@pytest.mark.parametrize(
    "bad,why",
    [
        ("['Eczema', 3]", "not all strings"),
        ("{'Eczema': 0.5}", "is a dict, expected a list"),
    ],
)
def test_label_literal_of_the_wrong_shape_is_quarantined(bad, why):
    parsed = parse([case_row("1", "dataset/images/1.png")], [label_row("1", names=bad, conf="[4, 2]")])
    assert parsed.cases["label_status"].iloc[0] == "malformed"
    assert why in parsed.quarantine["reason"].iloc[0]


def test_missing_required_column_is_a_clear_error_naming_the_file():
    cases_csv, labels_csv = files([case_row("1", "dataset/images/1.png")], [label_row("1")])
    cases_csv = cases_csv.replace(b"sex_at_birth", b"sex")
    with pytest.raises(MetadataError, match=r"scin_cases\.csv: missing required column\(s\) sex_at_birth"):
        parse_metadata(cases_csv, labels_csv)


def test_duplicate_case_id_keeps_the_first_and_quarantines_the_repeat():
    parsed = parse(
        [case_row("5", "dataset/images/1.png"), case_row("5", "dataset/images/2.png", age="AGE_30_TO_39")],
        [label_row("5")],
    )
    assert parsed.cases["case_id"].tolist() == ["5"]
    assert parsed.cases["age_group"].iloc[0] == "AGE_18_TO_29"
    row = parsed.quarantine.iloc[0]
    assert (row["file"], row["line"], row["case_id"], row["action"]) == ("scin_cases.csv", 3, "5", "row_dropped")
    assert "first seen at line 2" in row["reason"]
    assert parsed.images["object_path"].tolist() == ["dataset/images/1.png"]


def test_header_only_csv_is_a_clear_error():
    cases_csv, labels_csv = files([], [label_row("1")])
    with pytest.raises(MetadataError, match=r"scin_cases\.csv: has a header but no data rows"):
        parse_metadata(cases_csv, labels_csv)


def test_empty_file_is_a_clear_error():
    _, labels_csv = files([], [label_row("1")])
    with pytest.raises(MetadataError, match=r"scin_cases\.csv: file is empty"):
        parse_metadata(b"", labels_csv)


def test_non_utf8_row_is_quarantined_by_line_and_the_rest_kept():
    cases_csv, labels_csv = files(
        [
            case_row("1", "dataset/images/1.png"),
            case_row("2", "dataset/images/2.png"),
            case_row("3", "dataset/images/3.png"),
        ],
        [label_row("1"), label_row("3")],
    )
    cases_csv = cases_csv.replace(b"2,SCIN,1.0.0", b"2,SC\xff\xfeIN,1.0.0")
    parsed = parse_metadata(cases_csv, labels_csv)
    assert parsed.cases["case_id"].tolist() == ["1", "3"]
    row = parsed.quarantine.iloc[0]
    assert (row["file"], row["line"], row["column"]) == ("scin_cases.csv", 3, "source")
    assert "not UTF-8" in row["reason"]


def test_row_with_wrong_field_count_is_quarantined():
    parsed = parse([case_row("1", "dataset/images/1.png"), "2,SCIN,1.0.0"], [label_row("1")])
    assert parsed.cases["case_id"].tolist() == ["1"]
    assert "has 3 fields, the header has 15" in parsed.quarantine["reason"].iloc[0]


def test_unterminated_quote_is_a_clear_error():
    cases_csv, labels_csv = files([case_row("1", "dataset/images/1.png")], [label_row("1")])
    with pytest.raises(MetadataError, match=r"scin_labels\.csv"):
        parse_metadata(cases_csv, labels_csv.replace(b'0.33}"', b"0.33}"))


def test_unknown_enum_value_is_kept_and_flagged():
    parsed = parse([case_row("1", "dataset/images/1.png", age="AGE_90_TO_99")], [label_row("1")])
    assert parsed.cases["age_group"].iloc[0] == "AGE_90_TO_99"
    assert "AGE_90_TO_99" in parsed.cases["age_group"].cat.categories
    row = parsed.quarantine.iloc[0]
    assert (row["column"], row["action"]) == ("age_group", "flagged")


def test_labels_for_unknown_cases_are_reported():
    parsed = parse([case_row("1", "dataset/images/1.png")], [label_row("1"), label_row("999")])
    assert parsed.cases["case_id"].tolist() == ["1"]
    row = parsed.quarantine.iloc[0]
    assert (row["file"], row["case_id"]) == ("scin_labels.csv", "999")
    assert "not in scin_cases.csv" in row["reason"]


def test_invalid_case_id_is_quarantined():
    parsed = parse(
        [case_row("1.5e18", "dataset/images/1.png"), case_row("2", "dataset/images/2.png")], [label_row("2")]
    )
    assert parsed.cases["case_id"].tolist() == ["2"]
    assert "not a signed 64-bit integer" in parsed.quarantine["reason"].iloc[0]


def test_out_of_range_monk_tone_is_nulled_and_reported():
    parsed = parse([case_row("1", "dataset/images/1.png")], [label_row("1", tone_us="11")])
    assert pd.isna(parsed.cases["monk_skin_tone_label_us"].iloc[0])
    assert "not an integer 1-10" in parsed.quarantine["reason"].iloc[0]


def test_limit_cases_is_a_deterministic_sample():
    rows = [case_row(str(i), f"dataset/images/{i}.png") for i in range(1, 41)]
    labels = [label_row(str(i)) for i in range(1, 41)]
    first = parse(rows, labels, limit_cases=10)
    again = parse(rows, labels, limit_cases=10)
    other_seed = parse(rows, labels, limit_cases=10, sample_seed=1)
    assert len(first.cases) == 10
    assert first.cases["case_id"].tolist() == again.cases["case_id"].tolist()
    assert set(first.cases["case_id"]) != set(other_seed.cases["case_id"])
    assert first.cases["case_id"].tolist() != [str(i) for i in range(1, 11)]  # not just the first rows
    assert set(first.images["case_id"]) == set(first.cases["case_id"])


# --- The real release (SCIN v1.0.0): the bundled copy (SCIN_METADATA_DIR overrides) -----------------


@pytest.mark.real_metadata
def test_real_release_counts(real_parsed_metadata):
    cases, images = real_parsed_metadata.cases, real_parsed_metadata.images
    assert len(cases) == 5033
    assert cases["case_id"].is_unique
    assert len(images) == 10407
    assert images["object_path"].nunique() == 10380
    shared = images[images["n_references"] > 1]
    assert shared["object_path"].nunique() == 15 and len(shared) == 42
    assert int(cases["has_label"].sum()) == 3061
    assert int((~cases["has_label"]).sum()) == 1972
    assert real_parsed_metadata.quarantine.empty
    assert (images["path_status"] == "ok").all()


@pytest.mark.real_metadata
def test_real_release_distributions(real_parsed_metadata):
    cases = real_parsed_metadata.cases
    grader1 = cases["dermatologist_gradable_for_skin_condition_1"].value_counts()
    assert grader1["DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT"] == 3049
    assert grader1["NO_IMAGE_QUALITY_INSUFFICIENT"] == 1925
    assert grader1["YES_IMAGE_QUALITY_SUFFICIENT_NO_DISCERNIBLE_PATHOLOGY"] == 59
    assert int((cases["n_label_graders"] == 3).sum()) == 716
    tones = cases["monk_skin_tone_label_us"].value_counts().sort_index()
    assert tones.tolist() == [577, 1660, 1265, 687, 361, 248, 137, 57, 11, 2]
    assert int(cases["monk_skin_tone_label_us"].isna().sum()) == 28
    fst = cases["fst_dermatologist"].value_counts()
    assert [fst[f"FST{i}"] for i in range(1, 7)] == [391, 1432, 1332, 719, 359, 69]
    assert int(cases["fst_dermatologist"].isna().sum()) == 731
    top = cases["top_label"].value_counts()
    assert (top["Eczema"], top["Allergic Contact Dermatitis"], top["Urticaria"], top["Insect Bite"]) == (
        488,
        270,
        214,
        185,
    )
    assert cases["top_label"].nunique() == 211
    assert len({n for names in cases["weighted_label_names"] for n in names}) == 370


@pytest.mark.real_metadata
def test_real_release_gradable_unlabelled_rule(real_parsed_metadata):
    cases = real_parsed_metadata.cases
    unlabelled = cases[~cases["has_label"]]
    g1 = unlabelled["dermatologist_gradable_for_skin_condition_1"] == "DEFAULT_YES_IMAGE_QUALITY_SUFFICIENT"
    assert int(g1.sum()) == 46
    any_yes = unlabelled[schema.GRADABLE_CONDITION_COLUMNS].isin(schema.GRADABILITY_VALUES[:2]).any(axis=1)
    assert int(any_yes.sum()) == 110
    status = cases["label_status"].value_counts()
    assert status["gradable_unlabelled"] + status["no_pathology"] == 110
    assert status["labelled"] == 3061


@pytest.mark.real_metadata
def test_real_release_known_missing_image_is_referenced(real_parsed_metadata):
    images = real_parsed_metadata.images
    assert (images["object_path"] == "dataset/images/-2243186711511406658.png").sum() == 1
