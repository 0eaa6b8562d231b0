"""core.case_patterns: planted presentations are found, k is chosen by silhouette, stability is measured,
profiles describe who and what each cluster holds, and the two views are compared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from scin_pipeline.core import case_patterns as cp
from scin_pipeline.core import schema

# Three planted presentations: (ticked check boxes, duration, related category, label)
PATTERNS = [
    (["condition_symptoms_itching", "body_parts_arm", "textures_raised_or_bumpy"], "ONE_DAY", "RASH", "Urticaria"),
    (
        ["condition_symptoms_pain", "other_symptoms_fatigue", "body_parts_torso_back"],
        "MORE_THAN_ONE_YEAR",
        "OTHER_ISSUE_DESCRIPTION",
        "Psoriasis",
    ),
    (
        ["textures_flat", "body_parts_leg", "condition_symptoms_darkening"],
        "THREE_TO_TWELVE_MONTHS",
        "PIGMENTARY_PROBLEM",
        "Melasma",
    ),
]
FLAGS = schema.TEXTURE_COLUMNS + schema.BODY_PART_COLUMNS + schema.SYMPTOM_COLUMNS


def planted_cases(
    n_per_pattern: int = 60, n_no_answers: int = 15, *, noise: float = 0.03, seed: int = 0
) -> pd.DataFrame:
    """Cases in three planted answer patterns (each flag flipped with probability ``noise``), every other case
    unlabelled, deep tones (Monk 8) only in pattern 2, plus cases that answered nothing."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, (ticked, duration, category, label) in enumerate(PATTERNS):
        for i in range(n_per_pattern):
            row = {flag: (flag in ticked) != (rng.random() < noise) for flag in FLAGS}
            labelled = i % 2 == 0
            row.update(
                case_id=f"p{p}-{i}",
                condition_duration=duration,
                related_category=category,
                planted=p,
                has_label=labelled,
                top_label=label if labelled else None,
                label_status="labelled" if labelled else "ungradable",
                monk_skin_tone_label_us=8 if p == 1 else 2,
                monk_skin_tone_label_india=8 if p == 1 else 2,
                sex_at_birth="FEMALE" if p == 2 else "MALE",
                age_group="AGE_30_TO_39",
                fitzpatrick_skin_type="FST2",
                fst_dermatologist="FST2",
            )
            rows.append(row)
    for i in range(n_no_answers):
        row = {flag: False for flag in FLAGS}
        row.update(
            case_id=f"none-{i}",
            condition_duration=None,
            related_category=None,
            planted=-1,
            has_label=False,
            top_label=None,
            label_status="ungradable",
            monk_skin_tone_label_us=None,
            monk_skin_tone_label_india=None,
            sex_at_birth=None,
            age_group=None,
            fitzpatrick_skin_type=None,
            fst_dermatologist=None,
        )
        rows.append(row)
    frame = pd.DataFrame(rows)
    if noise >= 0.5:  # no structure at all: the categorical answers are scattered across cases too
        answered = frame["planted"] >= 0
        for column in ("condition_duration", "related_category"):
            frame.loc[answered, column] = rng.permutation(frame.loc[answered, column].to_numpy())
    for column in schema.RACE_COLUMNS:
        frame[column] = False
    frame["monk_skin_tone_label_us"] = frame["monk_skin_tone_label_us"].astype("Int8")
    frame["monk_skin_tone_label_india"] = frame["monk_skin_tone_label_india"].astype("Int8")
    return frame


FAST = cp.PatternConfig(k_min=2, k_max=6, n_bootstrap=15, n_init=5)


@pytest.fixture(scope="module")
def planted():
    cases = planted_cases()
    return cases, cp.find_case_patterns(cases, FAST)


def test_planted_presentations_are_found_with_k_chosen_by_silhouette(planted):
    cases, patterns = planted
    view = patterns.views[cp.QUESTIONNAIRE]
    assert view.status == "clustered"
    assert view.k == 3
    assert view.k == int(view.selection.loc[view.selection["silhouette"].idxmax(), "k"])
    table = patterns.assignments.merge(cases[["case_id", "planted"]], on="case_id")
    answered = table[table["planted"] >= 0]
    assert adjusted_rand_score(answered["planted"], answered["questionnaire_cluster"]) > 0.95
    # The cases that answered nothing are their own named group, not forced into a cluster.
    assert (table.loc[table["planted"] < 0, "questionnaire_cluster"] == cp.NO_ANSWERS).all()
    assert not table.loc[table["planted"] < 0, "answered"].any()
    assert (table.loc[table["planted"] >= 0, "n_answers"] >= 3).all()
    # Clusters are numbered by size, every map position is finite for answered cases.
    assert set(answered["questionnaire_cluster"]) == {"Q1", "Q2", "Q3"}
    assert np.isfinite(answered[["questionnaire_x", "questionnaire_y"]].to_numpy()).all()


def test_planted_structure_is_stable_and_noise_is_not():
    planted = cp.find_case_patterns(planted_cases(), FAST).views[cp.QUESTIONNAIRE]
    assert planted.stability["n_bootstrap"] == FAST.n_bootstrap
    assert planted.stability["ari_mean"] > 0.95
    assert (planted.cluster_stability["jaccard_mean"] > 0.9).all()
    # Every answer drawn at random: no structure, so refits disagree with each other.
    noisy = planted_cases(noise=0.5, seed=1)
    structureless = cp.find_case_patterns(noisy, FAST).views[cp.QUESTIONNAIRE]
    assert structureless.silhouette < planted.silhouette - 0.2
    assert structureless.stability["ari_mean"] < planted.stability["ari_mean"] - 0.2


def test_profiles_describe_answers_people_and_labelled_members(planted):
    cases, patterns = planted
    table = patterns.assignments.merge(cases[["case_id", "planted"]], on="case_id")
    deep_cluster = table.loc[table["planted"] == 1, "questionnaire_cluster"].mode().iloc[0]
    profile = patterns.profiles[
        (patterns.profiles["view"] == cp.QUESTIONNAIRE) & (patterns.profiles["cluster"] == deep_cluster)
    ]
    share = profile.set_index(["facet", "value"])["share"]
    lift = profile.set_index(["facet", "value"])["lift"]
    assert share[("symptom", "condition_symptoms_pain")] > 0.9
    assert lift[("symptom", "condition_symptoms_pain")] > 2.5
    assert share[("body_part", "torso_back")] > 0.9
    assert share[("duration", "MORE_THAN_ONE_YEAR")] == 1.0
    assert share[("monk_us_bin", "7-10")] == 1.0
    # The label composition is over the labelled members only (half the cluster), not every member.
    labels = profile[profile["facet"] == "label"]
    assert labels["value"].tolist() == ["Psoriasis"] and labels["share"].iloc[0] == 1.0
    assert labels["n"].iloc[0] == 30
    status = profile[profile["facet"] == "label_status"].set_index("value")["share"]
    assert status["labelled"] == pytest.approx(0.5)
    # The no-answer group is profiled too.
    assert cp.NO_ANSWERS in set(patterns.profiles["cluster"])
    summary = cp.cluster_summary(patterns, cp.QUESTIONNAIRE).set_index("cluster")
    assert summary.loc[deep_cluster, "Monk US 7-10"] == 1.0
    assert "condition_symptoms_pain" in summary.loc[deep_cluster, "answers that set it apart (share, lift)"]
    assert summary.loc[deep_cluster, "commonest labels (of labelled members)"] == "Psoriasis 100%"
    # label_ami: planted clusters carry their labels.
    assert patterns.summary().set_index("view").loc[cp.QUESTIONNAIRE, "label_ami"] > 0.9
    said = "\n".join(cp.findings(patterns, cp.QUESTIONNAIRE))
    assert "3 of 3 clusters recur" in said
    assert f"to 100.0% ({deep_cluster})" in said  # every deep-tone case is in the planted pattern 2


def test_image_view_is_clustered_where_images_exist_and_compared_with_the_questionnaire():
    cases = planted_cases()
    rng = np.random.default_rng(4)
    with_images = cases[cases["planted"] >= 0].iloc[::2].reset_index(drop=True)  # half the answered cases
    centres = rng.normal(0, 5, (3, 16))
    embeddings = np.vstack(
        [centres[p] + rng.normal(0, 0.5, 16) for p in with_images["planted"] for _ in range(2)]
    ).astype(np.float32)  # two images per case
    image_rows = pd.DataFrame(
        {"case_id": np.repeat(with_images["case_id"].to_numpy(), 2), "row": np.arange(len(embeddings))}
    )
    patterns = cp.find_case_patterns(cases, FAST, embeddings=embeddings, image_rows=image_rows)
    image = patterns.views[cp.IMAGE]
    assert image.status == "clustered" and image.k == 3
    table = patterns.assignments
    assert table["has_images"].sum() == len(with_images)
    assert table.loc[~table["has_images"], "image_cluster"].isna().all()
    assert table.loc[table["has_images"], "image_cluster"].str.startswith("I").all()
    assert patterns.cross_view_ari > 0.95
    assert int(patterns.cross_view.to_numpy().sum()) == len(with_images)
    assert set(patterns.profiles["view"]) == {cp.QUESTIONNAIRE, cp.IMAGE}


def test_case_embeddings_average_a_case_s_images_and_share_a_file_between_cases():
    embeddings = np.array([[0.0, 0.0], [2.0, 4.0], [10.0, 10.0]], dtype=np.float32)
    rows = pd.DataFrame({"case_id": ["a", "a", "b", "c"], "row": [0, 1, 1, 2]})  # image 1 used by a and b
    has, means = cp.case_embeddings(embeddings, rows, pd.Series(["a", "b", "d"]))
    assert has.tolist() == [True, True, False]
    np.testing.assert_allclose(means, [[1.0, 2.0], [2.0, 4.0]])
    with pytest.raises(ValueError, match="outside 0..2"):
        cp.case_embeddings(embeddings, pd.DataFrame({"case_id": ["a"], "row": [7]}), pd.Series(["a"]))


def test_deterministic_and_small_views_are_reported_not_clustered(planted):
    cases, patterns = planted
    again = cp.find_case_patterns(cases, FAST)
    pd.testing.assert_frame_equal(patterns.assignments, again.assignments)
    tiny = cp.find_case_patterns(planted_cases(n_per_pattern=2, n_no_answers=1), FAST)
    assert tiny.views[cp.QUESTIONNAIRE].status.startswith("not clustered: 6 cases")
    assert tiny.assignments["questionnaire_cluster"].isna().sum() == 6
    assert "not clustered" in cp.patterns_markdown(tiny)


def test_bad_input_is_named():
    cases = planted_cases(n_per_pattern=5)
    with pytest.raises(ValueError, match="case_id p0-1 more than once"):
        cp.find_case_patterns(pd.concat([cases, cases.iloc[[1]]]), FAST)
    with pytest.raises(ValueError, match="k_min <= k_max"):
        cp.PatternConfig(k_min=5, k_max=3)


def test_maps_and_report(planted):
    _cases, patterns = planted
    maps = cp.map_pngs(patterns, title_note=" (SYNTHETIC images)")
    assert set(maps) == {"questionnaire_by_cluster", "questionnaire_by_label"}
    assert all(png.startswith(b"\x89PNG") for png in maps.values())
    markdown = cp.patterns_markdown(patterns, plots={k: f"{k}.png" for k in maps}, synthetic_images=True)
    assert "![questionnaire_by_label](questionnaire_by_label.png)" in markdown
    assert "k = 3" in markdown and cp.NO_ANSWERS in markdown
    # No image view here: the synthetic-image warning belongs to the image view only.
    assert "SYNTHETIC IMAGES" not in markdown
