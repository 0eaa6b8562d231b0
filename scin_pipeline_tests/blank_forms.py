"""What a candidate of a finished pipeline run answers to a blank questionnaire, for different images of its
cache: the check that the answer follows the image (issue 18: the served multimodal champion answered the
same "other 100 %" for every photo when the form was blank). SYNTHETIC images in every test that uses it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def held_out_images(data_root: Path, n: int) -> pd.DataFrame:
    """``n`` different validation/test images of the run's cache (image_tensors rows), taken label by label
    in turn, so that they show different conditions wherever the splits allow."""
    tables = data_root / "tables"
    splits = pd.read_parquet(tables / "labeled_splits.parquet")
    index = pd.read_parquet(tables / "image_tensors.parquet")
    cached = index[index["status"] == "ok"].drop_duplicates("image_id").set_index("image_id")
    held_out = splits[splits["split"].astype(str).isin(["val", "test"]) & splits["image_id"].isin(cached.index)]
    held_out = held_out.drop_duplicates("image_id")
    held_out = held_out.assign(turn=held_out.groupby("label").cumcount()).sort_values(["turn", "label", "image_id"])
    chosen = held_out["image_id"].head(n).tolist()
    assert len(chosen) == n, f"only {len(chosen)} held-out images cached under {data_root}"
    return cached.loc[chosen].reset_index()


def blank_form_answers(data_root: Path, model: str, n_images: int = 10) -> np.ndarray:
    """(n_images, K) probabilities of candidate ``model`` (its packaged model, as served) for ``n_images``
    different held-out images, each with a blank questionnaire (encoded as the service encodes one)."""
    from scin_pipeline.core import image_cache
    from scin_pipeline.core.packaged_model import KERAS_KINDS, METADATA_KINDS, PackagedClassifier
    from scin_pipeline.core.questionnaire import blank_questionnaires
    from scin_pipeline.resources import StoragePaths

    candidate = pd.read_parquet(data_root / "tables" / f"{model}.parquet").iloc[0]
    package_dir = Path(candidate["package_dir"])
    package = PackagedClassifier.load(package_dir if package_dir.is_absolute() else data_root / package_dir)
    rows = held_out_images(data_root, n_images)
    images = image_cache.load_images(rows, StoragePaths(data_root=str(data_root)).image_tensors_dir)
    return package.predict_proba(
        images=images if package.kind in KERAS_KINDS else None,
        cases=blank_questionnaires(n_images) if package.kind in METADATA_KINDS else None,
    )


def assert_follows_the_image(probabilities: np.ndarray, what: str) -> None:
    """Different images, a blank form: the answers differ (a constant answer is the failure)."""
    top = probabilities.argmax(axis=1)
    spread = probabilities.max(axis=0) - probabilities.min(axis=0)
    assert len(set(top.tolist())) >= 2, f"{what}: the same top condition for every image: {top.tolist()}"
    assert spread.max() > 0.1, f"{what}: probabilities barely move between images (spread {spread.round(3)})"
