"""Which cases a synthetic mirror holds and what generated metadata looks like: the pure rules.

Tests using ``scin_metadata_dir`` read the real SCIN CSVs (the bundled copy; SCIN_METADATA_DIR overrides).
"""

from __future__ import annotations

import pandas as pd
import pytest

from scin_pipeline.core import schema
from scin_pipeline.core.synthetic.metadata import case_monk_tone, select_case_ids, top_condition


def test_the_release_headers_are_the_schema_column_lists(scin_metadata_dir):
    for name, columns in (("scin_cases.csv", schema.CASES_COLUMNS), ("scin_labels.csv", schema.LABELS_COLUMNS)):
        header = (scin_metadata_dir / name).read_text(encoding="utf-8").split("\n", 1)[0]
        assert header.split(",") == columns, name


def test_top_condition_is_the_argmax_with_ties_broken_by_name():
    assert top_condition("{'Eczema': 0.41, 'Psoriasis': 0.59}") == "Psoriasis"
    assert top_condition("{'Tinea': 0.41, 'Eczema': 0.41, 'Impetigo': 0.18}") == "Eczema"
    assert top_condition("{}") == ""
    assert top_condition("") == ""
    assert top_condition("__import__('os').system('x')") == ""  # a literal only, never evaluated


def test_monk_tone_falls_back_from_us_to_india_to_tone_3():
    assert case_monk_tone("7", "2") == (7, "us")
    assert case_monk_tone("", "2") == (2, "india")
    assert case_monk_tone("11", "") == (3, "default")
    assert case_monk_tone("", "") == (3, "default")


def test_case_subset_is_seeded_nested_and_keeps_order():
    ids = [str(i) for i in range(-500, 500)]
    small = select_case_ids(ids, 50, seed=1)
    large = select_case_ids(ids, 200, seed=1)
    assert len(small) == 50 and len(large) == 200
    assert set(small) <= set(large)
    assert small == sorted(small, key=ids.index)
    assert select_case_ids(ids, 50, seed=1) == small
    assert set(select_case_ids(ids, 50, seed=2)) != set(small)
    assert select_case_ids(ids, None, seed=1) == ids
    with pytest.raises(ValueError):
        select_case_ids(ids, 1001, seed=1)


def test_real_subset_keeps_the_labelled_share(scin_metadata_dir):
    labels = pd.read_csv(scin_metadata_dir / "scin_labels.csv", dtype=str, keep_default_na=False)
    chosen = set(select_case_ids(labels["case_id"].tolist(), 1000, seed=0))
    labelled = labels[labels["case_id"].isin(chosen)]["weighted_skin_condition_label"] != "{}"
    assert 0.55 <= labelled.mean() <= 0.67  # the release: 3,061 / 5,033 = 0.608
