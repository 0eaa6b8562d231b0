"""SYNTHETIC bench of the unlabelled-data work: learning curves of the FixMatch image candidate against its
supervised twin with labels hidden on purpose, how often the labelling queue's top cases are hidden-label
cases of the classes the model gets most wrong, and what the new assets cost.

    python bench/semi_supervised.py                       # 600 synthetic cases, 64 px, seeds 0 and 1
    python bench/semi_supervised.py --cases 300 --seeds 0 --fractions 0.25 --skip-cost   # a quick look

Everything here runs on a SYNTHETIC mirror (generated metadata, synthetic images with one planted lesion
pattern per condition, a random-init ResNet50 backbone: no weights are reachable offline). The numbers say
whether the code learns from unlabelled images and what it costs; they say NOTHING about skin conditions.

1. One pipeline run (in this process, as the CLI runs it) materialises the curation, the caches, the
   unlabelled pool and the candidates; a thread samples this process's RSS every 20 ms, and each step's
   seconds and peak RSS come from the run's STEP_START/STEP_SUCCESS events (steps run one at a time).
   Peak RSS of a step is the process's, so it includes what earlier steps left allocated; "growth" is the
   peak minus the RSS at the step's start.
2. Learning curves, from that run's tables: for each fraction f, the labels of a seeded, class-stratified
   (1 - f) of the TRAIN cases are hidden (their images join the unlabelled stream beside the real pool's);
   validation and test stay as they are. The supervised twin (``training.train_head_on_embeddings``, what
   ``resnet50_transfer`` runs on CPU) and the FixMatch candidate (``semi_supervised``'s head on embedded
   views, what ``resnet50_fixmatch`` runs on CPU, FixMatchConfig defaults) train on the same kept labels
   with the same TrainConfig; test macro-F1 and balanced accuracy per image, as model_evaluation scores.
3. Labelling queue: every unlabelled case (hidden-label and real pool) ranked by
   ``core.labelling_queue.labelling_queue`` (hidden-label cases enter as ``gradable_unlabelled``, the real
   pool's with their own status), once with the image twin's probabilities (mean over a case's images) and
   once with the metadata model's (what the ``labelling_queue`` asset ranks by), each fitted on the kept
   labels; among the top K, the share that are hidden-label cases whose true class is one of the ``--worst``
   classes with the lowest test recall of that model, against the same share in the whole queue (what a
   random pick gives).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

BANNER = "SYNTHETIC DATA: synthetic images, generated metadata, random-init backbone; nothing here is about skin"
FRACTIONS = (0.10, 0.25, 0.50)
RUN_CONFIG_TRAIN = {"epochs": 15, "batch_size": 32, "early_stopping_patience": 5}
# The assets whose cost is measured, and the supervised twin each is set against.
COSTED = {
    "unlabelled_pool": "labeled_splits",
    "case_patterns": None,
    "resnet50_fixmatch": "resnet50_transfer",
    "metadata_model_self_trained": "metadata_model",
    "labelling_queue": None,
}


class RssTimeline:
    """(time, RSS) of this process every ``interval_s`` while the block runs."""

    def __init__(self, interval_s: float = 0.02):
        import psutil

        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.samples.append((time.time(), self._process.memory_info().rss))

    def __enter__(self) -> RssTimeline:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> tuple[float, float]:
        """(peak RSS, RSS at start) in MB over [start, end]."""
        times = np.array([t for t, _ in self.samples])
        rss = np.array([r for _, r in self.samples], dtype=np.float64) / 1e6
        inside = (times >= start) & (times <= end)
        before = rss[times <= start]
        first = before[-1] if len(before) else (rss[inside][0] if inside.any() else float("nan"))
        return (float(rss[inside].max()) if inside.any() else first), float(first)


def run_config(image_size: int) -> dict:
    train = {**RUN_CONFIG_TRAIN, "mode": "head_on_embeddings"}
    return {
        "ops": {
            "quality_filtered_index": {"config": {"max_quarantined_fraction": 0.2}},
            "labeled_splits": {"config": {"min_cases_per_class": 15, "rare_classes": "drop"}},
            "image_quality": {"config": {"tensor_sizes": [image_size]}},
            "image_embeddings": {"config": {"weights": "none"}},
            "baseline_cnn": {"config": RUN_CONFIG_TRAIN},
            "resnet50_transfer": {"config": train},
            "resnet50_fixmatch": {"config": train},
            "multimodal": {"config": train},
            "fairness_report": {"config": {"n_bootstrap": 50, "min_group_n": 10}},
            "cross_validated_predictions": {"config": {"n_folds": 3}},
            "model_comparison": {"config": {"unjudged_policy": "allow_with_flag"}},
        }
    }


def pipeline_run(work: Path, n_cases: int, image_size: int, seed: int) -> tuple[Path, pd.DataFrame]:
    """The mirror and one run of the whole graph; returns the data root and the cost table."""
    from dagster import DagsterEventType

    from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
    from scin_pipeline.runner import embedded_instance, embedded_mlflow_uri, run_pipeline

    mirror = write_synthetic_mirror(work / "mirror", n_cases=n_cases, seed=seed, image_size=(160, 120), defect_rate=0.0)
    data_root = work / "data"
    os.environ["MLFLOW_TRACKING_URI"] = embedded_mlflow_uri(data_root)
    started = time.time()
    with RssTimeline() as timeline:
        summary = run_pipeline(
            data_root=data_root, source=str(mirror.root), log_level="WARNING", run_config=run_config(image_size)
        )
    print(f"pipeline run: {time.time() - started:.0f} s, {'succeeded' if summary.success else 'FAILED'}")
    if not summary.success:
        raise SystemExit(summary.render())
    instance = embedded_instance(data_root)
    events = instance.all_logs(summary.run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS})
    steps: dict[str, dict[str, float]] = {}
    for event in events:
        kind = "start" if event.dagster_event_type == DagsterEventType.STEP_START else "end"
        steps.setdefault(str(event.step_key), {})[kind] = event.timestamp
    rows = []
    for step, times in steps.items():
        if "start" not in times or "end" not in times:
            continue
        peak, at_start = timeline.window(times["start"], times["end"])
        rows.append(
            {
                "step": step,
                "seconds": times["end"] - times["start"],
                "peak_rss_mb": peak,
                "growth_mb": peak - at_start,
            }
        )
    return data_root, pd.DataFrame(rows).sort_values("step").reset_index(drop=True)


def cost_report(costs: pd.DataFrame) -> pd.DataFrame:
    """The new assets beside their supervised twins (a multi-asset's step holds all its outputs)."""
    by_step = costs.set_index("step")
    rows = []
    for asset, twin in COSTED.items():
        if asset not in by_step.index:
            continue
        row = {"asset": asset, **by_step.loc[asset].to_dict(), "twin": twin or "-"}
        if twin and twin in by_step.index:
            row["twin_seconds"] = by_step.loc[twin, "seconds"]
            row["seconds_ratio"] = by_step.loc[asset, "seconds"] / by_step.loc[twin, "seconds"]
            row["twin_peak_rss_mb"] = by_step.loc[twin, "peak_rss_mb"]
            row["twin_growth_mb"] = by_step.loc[twin, "growth_mb"]
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ curves


def _tables(data_root: Path) -> dict[str, pd.DataFrame]:
    tables = data_root / "tables"
    return {
        name: pd.read_parquet(tables / f"{name}.parquet")
        for name in ("labeled_splits", "image_tensors", "image_embeddings", "unlabelled_pool", "cases")
    }


def hide_labels(train_rows: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Mask over ``train_rows``: True for the images of the cases whose label is KEPT. Per class, a seeded
    ``fraction`` of its train cases (at least one) keeps its label; the others are hidden."""
    cases = train_rows.drop_duplicates("case_id")[["case_id", "label"]]
    rng = np.random.default_rng([seed, int(round(fraction * 1000))])
    kept: list[str] = []
    for _, group in cases.groupby("label", sort=True):
        ids = group["case_id"].astype(str).to_numpy()
        n_keep = max(1, int(round(fraction * len(ids))))
        kept += list(rng.permutation(np.sort(ids))[:n_keep])
    return train_rows["case_id"].astype(str).isin(kept).to_numpy()


def learning_curves(
    data_root: Path,
    fractions: list[float],
    seeds: list[int],
    worst: int,
    top_k: int,
    epochs: int,
    batch_size: int,
    with_queue: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    import keras

    from scin_pipeline.core import evaluation, semi_supervised
    from scin_pipeline.core.image_cache import load_images, split_rows
    from scin_pipeline.core.models import build_classifier_head
    from scin_pipeline.core.training import TrainConfig, predict_in_batches, train_head_on_embeddings

    t = _tables(data_root)
    labeled, tensors, embeddings = t["labeled_splits"], t["image_tensors"], t["image_embeddings"]
    classes = sorted(labeled["label"].astype(str).unique())
    cache_dir = data_root / "cache" / "image_tensors"
    matrix = np.load(embeddings["embeddings_file"].iloc[0], mmap_mode="r")
    position = embeddings.set_index("image_id")["row"]

    def embedded(rows: pd.DataFrame) -> np.ndarray:
        return np.asarray(matrix[position.reindex(rows["image_id"]).to_numpy()], dtype=np.float32)

    split = {name: split_rows(labeled, tensors, name, classes) for name in ("train", "val", "test")}
    (train_rows, y_train), (val_rows, y_val), (test_rows, y_test) = split["train"], split["val"], split["test"]
    e_train, e_val, e_test = embedded(train_rows), embedded(val_rows), embedded(test_rows)
    # The real pool's images that have cached pixels and embeddings (every quality-kept image, once the caches
    # cover them), as the candidate takes them.
    from scin_pipeline.assets.training import pool_image_rows

    pool_rows = pool_image_rows(t["unlabelled_pool"], labeled, tensors)
    pool_rows = pool_rows[pool_rows["image_id"].isin(position.index)].reset_index(drop=True)
    pool_case = t["unlabelled_pool"].drop_duplicates("image_id").set_index("image_id")["case_id"].astype(str)
    backbone = keras.saving.load_model(embeddings["backbone_file"].iloc[0])
    started = time.time()
    strong_train = semi_supervised.embed_views(
        backbone, load_images(train_rows, cache_dir), 2, semi_supervised.strong_augment_batch, seed=11
    )
    strong_pool = (
        semi_supervised.embed_views(
            backbone, load_images(pool_rows, cache_dir), 2, semi_supervised.strong_augment_batch, seed=12
        )
        if len(pool_rows)
        else np.zeros((2, 0, e_train.shape[1]), np.float32)
    )
    e_pool = embedded(pool_rows) if len(pool_rows) else np.zeros((0, e_train.shape[1]), np.float32)
    views_seconds = time.time() - started
    print(
        f"views: {len(train_rows)} train + {len(pool_rows)} real pool images x 2 strong views in "
        f"{views_seconds:.0f} s; {len(classes)} classes; val {len(val_rows)}, test {len(test_rows)} images"
    )
    config = TrainConfig(epochs=epochs, batch_size=batch_size, early_stopping_patience=max(5, epochs // 3))
    fixmatch = semi_supervised.FixMatchConfig()
    cases = t["cases"].assign(case_id=t["cases"]["case_id"].astype(str)).set_index("case_id")
    curve_rows, queue_rows = [], []
    for fraction in fractions:
        for seed in seeds:
            kept = hide_labels(train_rows, fraction, seed)
            config_seeded = TrainConfig(**{**config.to_dict(), "seed": seed})

            def head_builder(kept=kept):
                return build_classifier_head(e_train.shape[1], len(classes), 0.3, normalize_with=e_train[kept])

            began = time.time()
            twin = train_head_on_embeddings(
                e_train[kept], y_train[kept], e_val, y_val, head_builder=head_builder, config=config_seeded
            )
            twin_s = time.time() - began
            unl_plain = np.concatenate([e_train[~kept], e_pool])
            unl_strong = np.concatenate([strong_train[:, ~kept], strong_pool], axis=1)
            began = time.time()
            semi = semi_supervised.train_fixmatch_head_on_embeddings(
                e_train[kept][None],
                y_train[kept],
                unl_plain[None],
                unl_strong,
                e_val,
                y_val,
                head_builder=head_builder,
                config=config_seeded,
                fixmatch=fixmatch,
            )
            semi_s = time.time() - began
            # The same with the hidden-label images alone as the unlabelled stream: images of the very classes
            # being learnt, without the real pool's cases (conditions outside the label set, no condition).
            n_hidden = int((~kept).sum())
            began = time.time()
            semi_hidden = semi_supervised.train_fixmatch_head_on_embeddings(
                e_train[kept][None],
                y_train[kept],
                e_train[~kept][None],
                strong_train[:, ~kept],
                e_val,
                y_val,
                head_builder=head_builder,
                config=config_seeded,
                fixmatch=fixmatch,
            )
            hidden_s = time.time() - began
            for name, result, seconds, n_unlabelled in (
                ("supervised twin", twin, twin_s, 0),
                ("fixmatch", semi, semi_s, len(unl_plain)),
                ("fixmatch, hidden-label images only", semi_hidden, hidden_s, n_hidden),
            ):
                predicted = predict_in_batches(result.model, e_test).argmax(axis=1)
                curve_rows.append(
                    {
                        "kept_fraction": fraction,
                        "seed": seed,
                        "model": name,
                        "labelled_train_images": int(kept.sum()),
                        "unlabelled_images": n_unlabelled,
                        "test_macro_f1": evaluation.macro_f1(y_test, predicted),
                        "test_balanced_accuracy": evaluation.balanced_accuracy(y_test, predicted),
                        "final_pseudo_label_rate": float(result.history["pseudo_label_rate"].iloc[-1])
                        if "pseudo_label_rate" in result.history
                        else float("nan"),
                        "train_seconds": seconds,
                    }
                )
            if not with_queue:
                continue
            # The unlabelled cases (hidden-label train cases and the real pool's), their images' order.
            hidden = train_rows[~kept]
            image_case = np.concatenate(
                [
                    hidden["case_id"].astype(str).to_numpy(),
                    pool_case.reindex(pool_rows["image_id"]).astype(str).to_numpy(),
                ]
            )
            hidden_label = hidden.drop_duplicates("case_id").assign(case_id=lambda f: f["case_id"].astype(str))
            hidden_label = hidden_label.set_index("case_id")["label"].astype(str)
            labelled_ids = train_rows.loc[kept, "case_id"].astype(str).unique()
            common = dict(
                image_case=image_case,
                hidden_label=hidden_label,
                pool_table=t["unlabelled_pool"],
                cases=cases,
                labelled_ids=labelled_ids,
                classes=classes,
                worst=worst,
                top_k=top_k,
            )
            # The image twin: its probabilities per case (mean over the case's images), recall per test image.
            test_pred = predict_in_batches(twin.model, e_test).argmax(axis=1)
            image_proba = pd.DataFrame(predict_in_batches(twin.model, unl_plain)).groupby(image_case).mean()
            queue_rows.append(
                queue_hits(image_proba, class_recall(y_test, test_pred, classes), **common)
                | {"kept_fraction": fraction, "seed": seed, "ranked_by": "image twin (resnet50_transfer, CPU)"}
            )
            # The metadata model (what the labelling_queue asset ranks by), fitted on the kept cases.
            metadata_proba, metadata_recall = metadata_model_scores(
                cases, train_rows[kept], test_rows, y_test, image_proba.index, classes, seed
            )
            queue_rows.append(
                queue_hits(metadata_proba, metadata_recall, **common)
                | {"kept_fraction": fraction, "seed": seed, "ranked_by": "metadata_model"}
            )
    return pd.DataFrame(curve_rows), pd.DataFrame(queue_rows)


def class_recall(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.Series:
    """Recall of each class on the test split (NaN for a class with no test row)."""
    return pd.Series(
        [float((y_pred[y_true == k] == k).mean()) if (y_true == k).any() else np.nan for k in range(len(classes))],
        index=classes,
    )


def metadata_model_scores(
    cases: pd.DataFrame,
    kept_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    y_test: np.ndarray,
    unlabelled_ids: pd.Index,
    classes: list[str],
    seed: int,
) -> tuple[pd.DataFrame, pd.Series]:
    """The metadata model fitted on the kept train cases: its probabilities for the unlabelled cases and its
    recall per class on the test cases (one row per case)."""
    from scin_pipeline.core.metadata_model import fit_single_label_metadata_model, metadata_features

    index = {c: i for i, c in enumerate(classes)}
    train = kept_rows.drop_duplicates("case_id")
    model = fit_single_label_metadata_model(
        metadata_features(cases.loc[train["case_id"].astype(str)].reset_index()),
        train["label"].astype(str).map(index).to_numpy(np.int64),
        len(classes),
        seed=seed,
    )
    test = test_rows.drop_duplicates("case_id")
    predicted = model.predict_proba(metadata_features(cases.loc[test["case_id"].astype(str)].reset_index()))
    y_case = test["label"].astype(str).map(index).to_numpy()
    proba = model.predict_proba(metadata_features(cases.loc[unlabelled_ids.astype(str)].reset_index()))
    return pd.DataFrame(proba, index=unlabelled_ids), class_recall(y_case, predicted.argmax(axis=1), classes)


def queue_hits(
    case_proba: pd.DataFrame,
    recall: pd.Series,
    *,
    image_case: np.ndarray,
    hidden_label: pd.Series,
    pool_table: pd.DataFrame,
    cases: pd.DataFrame,
    labelled_ids: np.ndarray,
    classes: list[str],
    worst: int,
    top_k: int,
) -> dict:
    """Rank the unlabelled cases (rows of ``case_proba``) by the labelling queue's rule; how many of its top
    ``top_k`` are hidden-label cases of the ``worst`` classes (lowest ``recall``), against a random pick."""
    from scin_pipeline.core import labelling_queue as queue
    from scin_pipeline.core.fairness import sensitive_features

    worst_classes = set(recall.dropna().sort_values(kind="stable").index[:worst])
    pool_status = pool_table.assign(case_id=pool_table["case_id"].astype(str)).drop_duplicates("case_id")
    pool_status = pool_status.set_index("case_id")["reason"].astype(str)
    case_ids = case_proba.index.astype(str)
    pool_cases = pd.DataFrame(
        {
            "case_id": case_ids,
            # A hidden-label case is, as far as the queue knows, a gradable case nobody has labelled yet.
            "status": [
                "gradable_unlabelled" if c in hidden_label.index else pool_status.get(c, "gradable_unlabelled")
                for c in case_ids
            ],
            "n_images": pd.Series(image_case).value_counts().reindex(case_ids).fillna(0).astype(int).to_numpy(),
            "image_ids": [""] * len(case_ids),
        }
    )
    ranked = queue.labelling_queue(
        pool_cases,
        case_proba.to_numpy(),
        classes,
        sensitive_features(cases.loc[case_ids].reset_index()),
        sensitive_features(cases.loc[labelled_ids].reset_index()),
    )
    target = ranked["case_id"].map(lambda c: c in hidden_label.index and hidden_label[c] in worst_classes)
    k = min(top_k, len(ranked))
    return {
        "queued_cases": len(ranked),
        "hidden_label_cases": int(ranked["case_id"].isin(hidden_label.index).sum()),
        "worst_classes": ", ".join(sorted(worst_classes)),
        "top_k": k,
        "top_k_hits": int(target.head(k).sum()),
        "precision_at_k": float(target.head(k).mean()) if k else float("nan"),
        "random_pick_rate": float(target.mean()) if len(target) else float("nan"),
        # The same share among the hidden-label cases alone: the queue also favours them by status (a hidden
        # case enters as gradable_unlabelled, most of the real pool is ungradable, weighted lower).
        "random_hidden_pick_rate": float(target[ranked["case_id"].isin(hidden_label.index)].mean())
        if ranked["case_id"].isin(hidden_label.index).any()
        else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--worst", type=int, default=3, help="the classes with the lowest test recall")
    parser.add_argument("--top-k", type=int, default=20, help="the queue's top cases looked at")
    parser.add_argument("--work", type=Path, default=None, help="folder for the mirror and data root (temp)")
    parser.add_argument("--mirror-seed", type=int, default=5)
    parser.add_argument("--skip-queue", action="store_true", help="learning curves and cost only")
    parser.add_argument(
        "--reuse", type=Path, default=None, help="the data root of an earlier run of this bench: curves only, no cost"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="scin-semi-"))
    print(BANNER)
    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 20)
    if args.reuse:
        data_root = args.reuse
    else:
        data_root, costs = pipeline_run(work, args.cases, args.image_size, args.mirror_seed)
        print("\nCost of the new assets in one pipeline run (SYNTHETIC mirror, in-process, 2-core machine):")
        print(cost_report(costs).round(2).to_string(index=False))
    curves, queue = learning_curves(
        data_root, args.fractions, args.seeds, args.worst, args.top_k, args.epochs, args.batch_size, not args.skip_queue
    )
    print(f"\nLearning curves (SYNTHETIC; test split, per image; seeds {args.seeds}):")
    print(curves.round(3).to_string(index=False))
    summary = (
        curves.groupby(["kept_fraction", "model"])[["test_macro_f1", "test_balanced_accuracy"]]
        .agg(["mean", "min", "max"])
        .round(3)
    )
    print("\nMean (min, max) over seeds:")
    print(summary.to_string())
    if not args.skip_queue:
        print(
            f"\nLabelling queue (SYNTHETIC): top {args.top_k} cases, hidden-label cases of the {args.worst} "
            "worst classes:"
        )
        print(queue.round(3).to_string(index=False))
    print(BANNER)


if __name__ == "__main__":
    main()
