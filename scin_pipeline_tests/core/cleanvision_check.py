"""cleanvision itself, run on what the quality stage computed: the tests' check that our per-image
cleanvision-style scores (core.quality) are cleanvision's, and agree with it on real files.

Test helpers only: the pipeline computes its scores without importing cleanvision.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import pandas as pd

CLEANVISION_ISSUES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "grayscale", "odd_size")


def cleanvision_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """cleanvision's scores and issue flags for decoded rows of an assessments table, by its own code.

    Uses cleanvision's property classes and default parameters on our raw properties, so the dataset-level
    ones (odd_size: an IQR rule over the whole set) come out as cleanvision would compute them on these
    images. Columns ``<issue>_score`` and ``is_<issue>_issue``; rows that did not decode are left out.
    """
    from cleanvision.issue_managers.image_property import (  # noqa: PLC0415 - heavy import, only here
        AspectRatioProperty,
        BlurrinessProperty,
        BrightnessProperty,
        ColorSpaceProperty,
        EntropyProperty,
        SizeProperty,
    )
    from cleanvision.issue_managers.image_property_issue_manager import ImagePropertyIssueManager

    ok = frame[frame["decode_status"] == "ok"]
    raw = pd.DataFrame(
        {
            "brightness_perc_99": ok["cv_brightness_perc_99"],
            "brightness_perc_5": ok["cv_brightness_perc_5"],
            "aspect_ratio": ok["aspect_ratio"],
            "entropy": ok["cv_entropy"],
            "blurriness": ok["cv_blurriness"],
            "blurriness_grayscale_std": ok["cv_blurriness_grayscale_std"],
            "size": ok["cv_size"],
            "color_space": np.where(ok["grayscale_score"] == 0, "L", "RGB"),
        },
        index=ok.index,
    )
    params = ImagePropertyIssueManager().get_default_params()
    properties = {
        "dark": BrightnessProperty("dark"),
        "light": BrightnessProperty("light"),
        "blurry": BlurrinessProperty(),
        "low_information": EntropyProperty(),
        "odd_aspect_ratio": AspectRatioProperty(),
        "grayscale": ColorSpaceProperty(),
        "odd_size": SizeProperty(),
    }
    out = pd.DataFrame(index=ok.index)
    out["image_id"] = ok["image_id"]
    for issue, prop in properties.items():
        issue_params = dict(params[issue])
        threshold = issue_params.pop("threshold", None)
        scores = (
            prop.get_scores(raw[prop.score_columns], issue, **issue_params)
            if len(raw)
            else pd.DataFrame({f"{issue}_score": pd.Series(dtype=float)})
        )
        flags = (
            prop.mark_issue(scores, issue, threshold)
            if len(raw)
            else pd.DataFrame({f"is_{issue}_issue": pd.Series(dtype=bool)})
        )
        out[f"{issue}_score"] = scores[f"{issue}_score"].astype(float)
        out[f"is_{issue}_issue"] = flags[f"is_{issue}_issue"].astype(bool)
    return out


def validate_against_cleanvision(paths: Sequence[str], ours: pd.DataFrame) -> pd.DataFrame:
    """Run cleanvision's Imagelab on ``paths`` and compare with our scores for the same files.

    ``ours`` is the assessments table of the same files in the same order (row i is paths[i]); files that
    did not decode are left out (cleanvision would stop on them). Per issue: n, the Spearman rank
    correlation of the scores, the share of files where both flag or both pass, and how many each flags.
    Meant for a small sample: cleanvision reads every file again at full size.
    """
    from cleanvision import Imagelab  # noqa: PLC0415 - heavy import, only here

    if len(paths) != len(ours):
        raise ValueError(f"{len(paths)} paths but {len(ours)} rows of ours")
    ours = ours.reset_index(drop=True)
    ok = (ours["decode_status"] == "ok").to_numpy()
    ok_paths = [str(p) for p, keep in zip(paths, ok) if keep]
    ours_ok = ours[ok].reset_index(drop=True)
    if not ok_paths:
        return pd.DataFrame(
            columns=["issue", "n", "spearman", "flag_agreement", "n_flagged_cleanvision", "n_flagged_ours"]
        )
    lab = Imagelab(filepaths=ok_paths)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        # cleanvision draws tqdm progress bars even with verbose=False
        lab.find_issues({issue: {} for issue in CLEANVISION_ISSUES}, n_jobs=1, verbose=False)
    theirs = lab.issues.reindex(ok_paths).reset_index(drop=True)
    mine = cleanvision_scores(ours_ok).reset_index(drop=True)
    rows = []
    for issue in CLEANVISION_ISSUES:
        a, b = mine[f"{issue}_score"], theirs[f"{issue}_score"].astype(float)
        fa, fb = mine[f"is_{issue}_issue"].astype(bool), theirs[f"is_{issue}_issue"].astype(bool)
        constant = a.nunique() < 2 or b.nunique() < 2
        rows.append(
            {
                "issue": issue,
                "n": len(a),
                "spearman": np.nan if constant else float(a.corr(b, method="spearman")),
                "flag_agreement": float((fa == fb).mean()),
                "n_flagged_cleanvision": int(fb.sum()),
                "n_flagged_ours": int(fa.sum()),
            }
        )
    return pd.DataFrame(rows)
