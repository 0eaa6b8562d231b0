"""bench/semi_supervised.py's rules: which labels are hidden, and how step costs are read off the RSS timeline."""

from __future__ import annotations

import numpy as np
import pandas as pd

from bench.semi_supervised import RssTimeline, cost_report, hide_labels


def test_hidden_labels_are_stratified_by_class_deterministic_and_keep_one_per_class():
    rows = pd.DataFrame(
        {
            # 40 cases of "a" (two images each), 10 of "b", 1 of "c"
            "case_id": [f"a{i}" for i in range(40) for _ in range(2)] + [f"b{i}" for i in range(10)] + ["c0"],
            "label": ["a"] * 80 + ["b"] * 10 + ["c"],
        }
    )
    kept = hide_labels(rows, 0.25, seed=0)
    kept_cases = rows[kept].drop_duplicates("case_id")
    assert kept_cases["label"].value_counts().to_dict() == {"a": 10, "b": 2, "c": 1}
    # A case keeps or hides all its images together.
    assert rows.assign(kept=kept).groupby("case_id")["kept"].nunique().max() == 1
    shuffled = rows.sample(frac=1, random_state=3)
    assert set(shuffled[hide_labels(shuffled, 0.25, seed=0)]["case_id"]) == set(kept_cases["case_id"])
    assert not np.array_equal(kept, hide_labels(rows, 0.25, seed=1))
    # A larger fraction keeps a superset's size.
    assert hide_labels(rows, 0.5, seed=0).sum() > kept.sum()


def test_cost_report_sets_each_new_asset_beside_its_twin():
    timeline = RssTimeline()
    timeline.samples = [(0.0, 100_000_000), (1.0, 300_000_000), (2.0, 150_000_000), (3.0, 120_000_000)]
    assert timeline.window(0.5, 2.5) == (300.0, 100.0)
    costs = pd.DataFrame(
        {
            "step": ["resnet50_fixmatch", "resnet50_transfer", "case_patterns"],
            "seconds": [30.0, 10.0, 5.0],
            "peak_rss_mb": [900.0, 800.0, 500.0],
            "growth_mb": [100.0, 50.0, 20.0],
        }
    )
    report = cost_report(costs).set_index("asset")
    assert report.loc["resnet50_fixmatch", "seconds_ratio"] == 3.0
    assert report.loc["resnet50_fixmatch", "twin"] == "resnet50_transfer"
    assert report.loc["case_patterns", "twin"] == "-"
    assert "unlabelled_pool" not in report.index  # not in this run: not reported
