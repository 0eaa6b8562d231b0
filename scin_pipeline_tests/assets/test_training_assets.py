"""Training, evaluation, comparison and fairness on a SYNTHETIC mirror, end to end through Dagster.

The synthetic images draw one lesion pattern per condition (core/synthetic/lesions.py), so an image model that
learns anything must beat chance by far; that is the planted signal asserted here. No figure here says
anything about real skin conditions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from scin_pipeline.assets.evaluation import CANDIDATES  # the seven the demo test lists by name
from scin_pipeline.core.synthetic.mirror import write_synthetic_mirror
from scin_pipeline.runner import embedded_mlflow_uri, run_pipeline
from scin_pipeline_tests.blank_forms import assert_follows_the_image, blank_form_answers

pytestmark = pytest.mark.slow

MLFLOW_UI = "http://127.0.0.1:5999"
TRAIN = {"epochs": 15, "batch_size": 32, "early_stopping_patience": 5}
RUN_CONFIG = {
    "ops": {
        # Small synthetic images keep the suite CPU-sized; the rules are the same at 224 px.
        "quality_filtered_index": {"config": {"max_quarantined_fraction": 0.2}},
        # Only the conditions with their own synthetic pattern, each with enough cases: "other" would pool
        # several patterns (and nonspecific marks) into one class.
        "labeled_splits": {"config": {"min_cases_per_class": 15, "rare_classes": "drop"}},
        "image_quality": {"config": {"tensor_sizes": [64]}},
        "image_embeddings": {"config": {"weights": "none"}},
        "efficientnet_embeddings": {"config": {"weights": "none"}},
        "baseline_cnn": {"config": TRAIN},
        "resnet50_transfer": {"config": {**TRAIN, "mode": "head_on_embeddings"}},
        "resnet50_fixmatch": {"config": {**TRAIN, "mode": "head_on_embeddings"}},
        "efficientnet_transfer": {"config": {**TRAIN, "mode": "head_on_embeddings"}},
        "multimodal": {"config": {**TRAIN, "mode": "head_on_embeddings"}},
        "fairness_report": {"config": {"n_bootstrap": 50, "min_group_n": 10}},
        "cross_validated_predictions": {"config": {"n_folds": 3}},
        "model_comparison": {"config": {"unjudged_policy": "allow_with_flag"}},
    }
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    mirror = write_synthetic_mirror(root / "mirror", n_cases=600, seed=5, image_size=(160, 120), defect_rate=0.0)
    data_root = root / "data"
    uri = embedded_mlflow_uri(data_root)
    # The address of an MLflow UI (as `scin-pipeline ui` sets it): the candidates' metadata links to their runs.
    with pytest.MonkeyPatch.context() as env:  # restored on exit: no test leaves the variables behind
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("SCIN_MLFLOW_UI_URL", MLFLOW_UI)
        summary = run_pipeline(data_root=data_root, source=str(mirror.root), log_level="WARNING", run_config=RUN_CONFIG)
    return data_root, mirror, summary, uri


def table(data_root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(data_root / "tables" / f"{name}.parquet")


def overall(evaluation: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    part = evaluation[(evaluation["split"] == split) & (evaluation["class"].fillna("") == "")]
    return part.pivot_table(index="model", columns="metric", values="value")


def test_every_candidate_is_trained_evaluated_and_compared(trained):
    data_root, _mirror, summary, _uri = trained
    assert summary.success, summary.render()
    assert not summary.failed_blocking_checks, summary.render()
    for name in (
        "image_tensors",
        "image_embeddings",
        "efficientnet_embeddings",
        *CANDIDATES,
        "model_evaluation",
        "model_comparison",
        "fairness_report",
        "model_card",
    ):
        assert name in summary.materialized, f"{name} not materialised:\n{summary.render()}"
    scores = overall(table(data_root, "model_evaluation"))
    assert set(scores.index) == set(CANDIDATES)
    for metric in ("accuracy", "balanced_accuracy", "macro_f1", "top3_accuracy", "mean_ovr_auc", "ece"):
        assert scores[metric].notna().all(), metric


def test_image_models_learn_the_planted_signal(trained):
    data_root, _mirror, _summary, _uri = trained
    classes = json.loads(table(data_root, "baseline_cnn")["classes"].iloc[0])
    chance = 1 / len(classes)
    scores = overall(table(data_root, "model_evaluation"))
    assert len(classes) >= 5
    # Far above chance on the held-out test split: each synthetic condition has its own lesion pattern.
    # Measured at this size: resnet50_transfer 0.53, multimodal 0.53 (chance 0.14).
    # Both backbones side by side (weights=None, the embeddings seeded): resnet50_transfer 0.53 test / 0.63 val
    # balanced accuracy, efficientnet_transfer 0.15 / 0.18. Random-init EfficientNetV2-B0 features carry almost
    # nothing about these lesion patterns (a logistic probe on any of its pooled stages, three init seeds:
    # 0.17-0.32 test; ResNet50's stages 0.46-0.71), so efficientnet_transfer is not asserted above chance
    # here; core/test_training.py shows it learning the coarser planted patterns, and its real test is
    # with ImageNet weights. Not a dermatology result: SYNTHETIC images.
    for model in ("resnet50_transfer", "multimodal"):
        assert scores.loc[model, "balanced_accuracy"] > 2.5 * chance, (model, scores.loc[model].to_dict(), chance)
    # The notebooks' CNN (no translation invariance, ~500 images) stays near chance: its test balanced
    # accuracy varied from 0.11 to 0.21 between identical runs (TensorFlow's multithreaded CPU kernels do
    # not sum in a fixed order, and early stopping amplifies the difference), so it is not asserted above
    # chance. Transfer beats it by a wide margin in every run: the point of having a baseline.
    cnn = scores.loc["baseline_cnn", "balanced_accuracy"]
    assert scores.loc["resnet50_transfer", "balanced_accuracy"] > cnn + 0.15, scores["balanced_accuracy"].to_dict()


def test_image_candidates_are_calibrated_on_validation_and_evaluated_before_and_after(trained):
    from scin_pipeline.core.calibration import mean_nll
    from scin_pipeline.core.packaged_model import read_spec

    data_root, _mirror, _summary, uri = trained
    scores = overall(table(data_root, "model_evaluation"))
    predictions = table(data_root, "model_predictions")
    client = mlflow.MlflowClient(uri)
    for name in CANDIDATES:
        row = table(data_root, name).iloc[0]
        calibration = read_spec(data_root / row["package_dir"])["calibration"]  # relative to the data root
        assert scores.loc[name, ["ece", "ece_uncalibrated"]].notna().all(), name
        if row["kind"] == "sklearn_metadata":
            assert calibration is None
            assert scores.loc[name, "ece"] == pytest.approx(scores.loc[name, "ece_uncalibrated"])
            continue
        assert (calibration["method"], calibration["fitted_on"]) == ("temperature_scaling", "val"), name
        assert calibration["nll_after"] <= calibration["nll_before"], name
        # model_predictions holds the served (calibrated) probabilities of the very rows the fit saw: their
        # NLL is the fit's validation NLL after calibration.
        val = predictions[(predictions["model"] == name) & (predictions["split"] == "val")]
        p_columns = sorted((c for c in val.columns if c.startswith("p_")), key=lambda c: int(c[2:]))
        if row["kind"] == "keras_multimodal":
            # Served with answers and with blank forms: one T fitted on the val rows as both (core test:
            # test_calibration.py), so the rows count twice and the NLL is over both forms.
            assert calibration["questionnaire"] == "answered+blank", name
            assert calibration["fitted_rows"] == 2 * len(val), name
        else:
            assert calibration["questionnaire"] == "", name
            assert calibration["fitted_rows"] == len(val), name
            assert mean_nll(val[p_columns].to_numpy(), val["y_true"].to_numpy()) == pytest.approx(
                calibration["nll_after"], rel=1e-6
            ), name
        metrics = client.get_run(row["mlflow_run_id"]).data.metrics
        assert metrics["calibration_temperature"] == pytest.approx(calibration["temperature"]), name
        assert "test_ece_uncalibrated" in metrics and "test_ece" in metrics, name


def test_fixmatch_candidate_learns_from_the_unlabelled_pool(trained):
    data_root, _mirror, _summary, uri = trained
    pool = table(data_root, "unlabelled_pool")
    labelled_images = set(table(data_root, "labeled_splits")["image_id"])
    assert len(pool)
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`scin.candidate` = 'resnet50_fixmatch'",
    )
    assert len(runs) == 1
    run = runs[0]
    # Every pool image has cached pixels and an embedding: the candidate trained on them (none of them a
    # labelled image), not as its supervised twin.
    expected = len(set(pool["image_id"]) - labelled_images)
    assert int(run.data.params["n_pool_images"]) == expected > 0
    assert run.data.params["resolved_mode"] == "head_on_embeddings"
    assert client.get_metric_history(run.info.run_id, "pseudo_label_rate")
    # Its weak and strong views were embedded once, beside its checkpoints (a resumed run reuses them).
    views = np.load(next((data_root / "checkpoints" / "resnet50_fixmatch").glob("*/pool_strong_views.npy")))
    assert views.shape[:2] == (2, expected)
    # SYNTHETIC images with a planted pattern per class: far above chance, as its twin.
    chance = 1 / len(json.loads(table(data_root, "resnet50_fixmatch")["classes"].iloc[0]))
    scores = overall(table(data_root, "model_evaluation"))
    assert scores.loc["resnet50_fixmatch", "balanced_accuracy"] > 2.5 * chance, scores["balanced_accuracy"].to_dict()


@pytest.mark.parametrize(
    ("candidate", "embeddings_asset", "backbone"),
    [
        ("resnet50_transfer", "image_embeddings", "resnet50"),
        ("efficientnet_transfer", "efficientnet_embeddings", "efficientnetv2_b0"),
    ],
)
def test_each_transfer_candidate_packs_its_own_backbone_for_raw_uint8_images(
    trained, candidate, embeddings_asset, backbone
):
    """The packaged model takes raw uint8 pixels and applies, inside, exactly the preprocessing and backbone
    that made the embeddings its head was trained on (ResNet50: Caffe preprocessing added in front;
    EfficientNetV2-B0: its own rescaling), each from its own embeddings asset and cache folder."""
    import numpy as np

    from scin_pipeline.core import image_cache
    from scin_pipeline.core.packaged_model import PackagedClassifier

    data_root, _mirror, _summary, _uri = trained
    package = PackagedClassifier.load(data_root / table(data_root, candidate)["package_dir"].iloc[0])
    assert package.extra["backbone"] == backbone and package.model.input.dtype == "uint8"
    embeddings = table(data_root, embeddings_asset)
    embeddings_file = data_root / embeddings["embeddings_file"].iloc[0]  # relative to the data root
    assert embeddings_file.parent == data_root / "cache" / "image_embeddings" / backbone
    rows = embeddings.head(8)
    tensors = table(data_root, "image_tensors").set_index("image_id").loc[rows["image_id"]].reset_index()
    images = image_cache.load_images(tensors, data_root / "cache" / "image_tensors")
    inside = package.model.get_layer(f"{backbone}_backbone").predict(images, verbose=0)
    np.testing.assert_allclose(inside, np.load(embeddings_file)[rows["row"].to_numpy()], rtol=1e-4, atol=1e-4)


def test_training_runs_are_tagged_with_dagster_run_and_split_version(trained):
    data_root, _mirror, summary, uri = trained
    from scin_pipeline.core.splits import splits_data_version

    expected_version = splits_data_version(table(data_root, "labeled_splits"))
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_candidate = {r.data.tags.get("scin.candidate"): r for r in runs}
    assert set(CANDIDATES) <= set(by_candidate)
    for name in CANDIDATES:
        run = by_candidate[name]
        tags = run.data.tags
        assert tags["dagster.run_id"] == summary.run_id
        assert tags["dagster.asset_key"] == name
        assert tags["scin.splits_data_version"] == expected_version
        assert tags["dagster.code_version"]
        assert tags["scin.synthetic_data"] == "true"
        assert run.info.status == "FINISHED"
        assert "test_balanced_accuracy" in run.data.metrics
    keras_run = by_candidate["baseline_cnn"]
    history = client.get_metric_history(keras_run.info.run_id, "val_macro_f1")
    assert len(history) >= 2 and sorted(m.step for m in history) == [
        m.step for m in sorted(history, key=lambda m: m.step)
    ]
    artifacts = {a.path for a in client.list_artifacts(keras_run.info.run_id)}
    assert {"keras", "training_curves.png", "evaluation", "fairness"} <= artifacts | {
        a.path.split("/")[0] for a in client.list_artifacts(keras_run.info.run_id)
    }


def test_mlflow_names_the_restored_epochs_metrics_best_val_as_the_comparison_reads_them(trained):
    data_root, _mirror, _summary, uri = trained
    client = mlflow.MlflowClient(uri)
    validation = overall(table(data_root, "model_evaluation"), split="val")
    comparison = table(data_root, "model_comparison").set_index("model")
    for name in ("baseline_cnn", "resnet50_transfer", "multimodal"):
        run = client.get_run(table(data_root, name)["mlflow_run_id"].iloc[0])
        metrics, best_epoch = run.data.metrics, int(run.data.metrics["best_epoch"])
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_balanced_accuracy")}
        # val_* per step runs to the last epoch; best_val_* is the epoch whose weights were kept ...
        assert metrics["val_balanced_accuracy"] == history[max(history)]
        assert metrics["best_val_balanced_accuracy"] == pytest.approx(history[best_epoch], abs=1e-12), name
        # best_val_score is the monitored figure: macro-F1, or for multimodal its both-forms mean (answered, blank).
        monitor = table(data_root, name)["monitor"].iloc[0]
        assert monitor == ("val_both_forms_macro_f1" if name == "multimodal" else "val_macro_f1"), name
        assert metrics[f"best_{monitor}"] == pytest.approx(metrics["best_val_score"]), name
        if name == "multimodal":
            both_forms = (metrics["best_val_macro_f1"] + metrics["best_val_blank_macro_f1"]) / 2
            assert metrics["best_val_score"] == pytest.approx(both_forms), name
        else:
            assert metrics["best_val_score"] == pytest.approx(metrics["best_val_macro_f1"]), name
        # ... which the package reproduces: the comparison's validation figures are the same numbers.
        for metric in ("balanced_accuracy", "macro_f1", "accuracy"):
            packaged = validation.loc[name, metric]
            assert metrics[f"best_val_{metric}"] == pytest.approx(packaged, abs=1e-6), (name, metric)
        assert comparison.loc[name, "val_balanced_accuracy"] == pytest.approx(metrics["best_val_balanced_accuracy"])
    metadata_run = client.get_run(table(data_root, "metadata_model")["mlflow_run_id"].iloc[0])
    assert metadata_run.data.metrics["best_val_macro_f1"] == metadata_run.data.metrics["val_macro_f1"]  # one fit


def latest_metadata(data_root: Path, asset: str) -> dict:
    from dagster import AssetKey

    from scin_pipeline.runner import embedded_instance

    event = embedded_instance(data_root).get_latest_materialization_event(AssetKey(asset))
    assert event is not None and event.asset_materialization is not None, asset
    return dict(event.asset_materialization.metadata)


def test_each_candidate_shows_its_curves_validation_figures_and_run_link_in_dagster(trained):
    from dagster import FloatMetadataValue, MarkdownMetadataValue, UrlMetadataValue

    data_root, _mirror, _summary, uri = trained
    client = mlflow.MlflowClient(uri)
    for name in CANDIDATES:
        metadata = latest_metadata(data_root, name)
        run_id = table(data_root, name)["mlflow_run_id"].iloc[0]
        run = client.get_run(run_id)
        link = metadata["mlflow_run_url"]
        assert isinstance(link, UrlMetadataValue)
        assert link.url == f"{MLFLOW_UI}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        # Flat float entries (Dagster plots them over materialisations), not a JSON blob: the kept weights'
        # validation metrics, the same names and numbers as the run's.
        assert not {"val_metrics", "best_val_metrics", "val_blank_metrics"} & set(metadata)
        best_val = {k: v for k, v in run.data.metrics.items() if k.startswith("best_val_") and k != "best_val_score"}
        assert {"best_val_macro_f1", "best_val_balanced_accuracy", "best_val_accuracy"} <= set(best_val), name
        for figure, value in best_val.items():
            assert isinstance(metadata[figure], FloatMetadataValue), (name, figure)
            assert metadata[figure].value == value, (name, figure)
        if table(data_root, name)["kind"].iloc[0] == "sklearn_metadata":  # one fit, no epochs: no curves
            assert "training_curves" not in metadata
            continue
        curves = metadata["training_curves"]
        assert isinstance(curves, MarkdownMetadataValue) and curves.md_str
        assert curves.md_str.startswith(f"![{name} training curves](data:image/png;base64,")


def test_fairness_figures_the_gate_and_the_splits_reach_each_candidates_mlflow_run(trained):
    import math

    from scin_pipeline.core.fairness import run_metric_name
    from scin_pipeline.core.splits import splits_data_version

    data_root, _mirror, _summary, uri = trained
    client = mlflow.MlflowClient(uri)
    report = table(data_root, "fairness_report")
    gates = table(data_root, "fairness_gates").set_index("model")
    splits_version = splits_data_version(table(data_root, "labeled_splits"))
    deep_tones_seen = 0
    for name in CANDIDATES:
        run = client.get_run(table(data_root, name)["mlflow_run_id"].iloc[0])
        metrics = run.data.metrics
        rows = report[
            (report["model"] == name)
            & (report["attribute"] == "monk_us_bin")
            & (report["metric"] == "balanced_accuracy")
        ]
        assert len(rows)
        for row in rows.itertuples():
            key = run_metric_name("monk_us_bin", str(row.group), "balanced_accuracy")
            deep_tones_seen += key == "fair.monk_us_bin.7-10.balanced_accuracy"
            assert metrics[run_metric_name("monk_us_bin", str(row.group), "n")] == row.n
            for bound, expected in ((None, row.value), ("ci_low", row.ci_low), ("ci_high", row.ci_high)):
                name_of = run_metric_name("monk_us_bin", str(row.group), "balanced_accuracy", bound)
                if math.isfinite(expected):
                    assert metrics[name_of] == pytest.approx(expected), name_of
                else:
                    assert name_of not in metrics
        assert run.data.tags["scin.fairness_status"] == gates.loc[name, "status"]
        assert run.data.tags["scin.fairness_reason"] == gates.loc[name, "reason"][:4000]
        (splits,) = [d for d in run.inputs.dataset_inputs if d.dataset.name == "labeled_splits"]
        assert splits.dataset.digest == splits_version
        assert json.loads(splits.dataset.source)["uri"].endswith("labeled_splits.parquet")
        assert {(t.key, t.value) for t in splits.tags} == {("mlflow.data.context", "training")}
    assert deep_tones_seen == len(CANDIDATES)  # the example name of the issue, on every run


def test_a_candidates_run_key_is_the_one_recipe_of_its_inputs(trained):
    data_root, _mirror, _summary, uri = trained
    from dagster import AssetKey

    from scin_pipeline.assets.training import MetadataModelConfig, frame_version, metadata_model
    from scin_pipeline.core.splits import splits_data_version
    from scin_pipeline.resources.mlflow_tracking import RUN_KEY_TAG, run_key_for

    row = table(data_root, "metadata_model").iloc[0]
    expected = run_key_for(
        asset_key="metadata_model",
        code_version=metadata_model.code_versions_by_key[AssetKey("metadata_model")],
        config=MetadataModelConfig().model_dump(),
        splits_data_version=splits_data_version(table(data_root, "labeled_splits")),
        inputs_version=frame_version(table(data_root, "cases"), ["case_id"]),
    )
    assert row["run_key"] == expected
    assert mlflow.MlflowClient(uri).get_run(row["mlflow_run_id"]).data.tags[RUN_KEY_TAG] == expected


def test_champion_alias_names_the_rule_winner_and_predicts_in_a_fresh_process(trained):
    data_root, mirror, _summary, uri = trained
    comparison = table(data_root, "model_comparison")
    champion = comparison[comparison["champion"]]
    assert len(champion) == 1
    client = mlflow.MlflowClient(uri)
    alias = client.get_model_version_by_alias("scin-condition-classifier", "champion")
    assert str(alias.version) == str(champion["registered_version"].iloc[0])
    eligible = comparison[comparison["passed_over"] == ""]
    # The rule ranks by the weighted score of the answered and the blank-questionnaire macro-F1.
    assert champion["val_selection_score"].iloc[0] == eligible["val_selection_score"].max()
    image = next((mirror.root / "dataset" / "images").glob("*.png"))
    case = table(data_root, "cases").iloc[0]
    script = (
        "import sys, mlflow, pandas as pd\n"
        "model = mlflow.pyfunc.load_model('models:/scin-condition-classifier@champion')\n"
        f"frame = pd.DataFrame({{'image': [open({str(image)!r}, 'rb').read()], "
        f"'age_group': [{str(case['age_group'])!r}]}})\n"
        "out = model.predict(frame)\n"
        "print(out.to_json(orient='records'))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    probabilities = json.loads(done.stdout.strip().splitlines()[-1])[0]
    classes = json.loads(
        comparison.merge(table(data_root, "baseline_cnn")[["model", "classes"]], how="left", on="model")["classes"]
        .dropna()
        .iloc[0]
    )
    assert set(probabilities) == set(classes)
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)


def test_candidates_that_read_the_questionnaire_are_scored_with_blank_ones_too(trained):
    data_root, _mirror, _summary, uri = trained
    evaluation = table(data_root, "model_evaluation")
    answered, blank = overall(evaluation, "val"), overall(evaluation, "val_blank")
    assert set(blank.index) == set(CANDIDATES)
    # The image-only candidates read no questionnaire: the same scores; the others are scored again.
    for model in ("baseline_cnn", "resnet50_transfer"):
        assert blank.loc[model].to_dict() == answered.loc[model].to_dict(), model
    # The metadata model has nothing else to go on: a blank form gets one answer whatever the image.
    metadata_only = blank_form_answers(data_root, "metadata_model")
    assert (metadata_only == metadata_only[0]).all()
    # Trained with modality dropout, the multimodal model answers a blank form from the image.
    assert table(data_root, "multimodal")["questionnaire_dropout"].iloc[0] == 0.3
    assert blank.loc["multimodal", "balanced_accuracy"] > 2 / len(classes_of(data_root)), blank.loc["multimodal"]
    assert_follows_the_image(blank_form_answers(data_root, "multimodal"), "multimodal")
    run = mlflow.MlflowClient(uri).get_run(table(data_root, "multimodal")["mlflow_run_id"].iloc[0])
    assert {"val_blank_macro_f1", "val_blank_balanced_accuracy"} <= set(run.data.metrics)


def classes_of(data_root: Path) -> list[str]:
    return json.loads(table(data_root, "baseline_cnn")["classes"].iloc[0])


def test_fairness_report_and_model_card_are_written(trained):
    data_root, _mirror, _summary, _uri = trained
    report = table(data_root, "fairness_report")
    assert {"model", "attribute", "group", "n", "metric", "value", "ci_low", "ci_high"} <= set(report.columns)
    assert set(report["model"]) == set(CANDIDATES)
    assert "monk_us_bin" in set(report["attribute"])
    files = data_root / "tables" / "fairness_report"
    for name in CANDIDATES:
        html = (files / f"{name}.html").read_text()
        assert "SYNTHETIC" in html and "http://" not in html and "https://" not in html
    card = (data_root / "tables" / "model_card" / "model_card.md").read_text()
    assert "NOT FOR DIAGNOSIS" in card.upper()
    manifest = json.loads((data_root / "tables" / "model_card" / "model_card.json").read_text())
    # The manifest names the champion that model_comparison chose, as registered.
    comparison = table(data_root, "model_comparison")
    champion = comparison[comparison["champion"].fillna(False).astype(bool)].iloc[0]
    assert manifest["model"]["name"] == champion["model"]
    assert manifest["model"]["version"] == str(champion["registered_version"])
    assert manifest["model"]["uri"] == "models:/scin-condition-classifier@champion"
    # The card's first lines say what the gate decided, on what bar; the version carries the status.
    assert "Fairness gate: " in "\n".join(card.splitlines()[:8]) and "min_group_n 10" in card
    version = mlflow.MlflowClient(_uri).get_model_version(
        "scin-condition-classifier", str(champion["registered_version"])
    )
    assert version.tags["scin.fairness_status"] == champion["fairness_status"]


def test_the_gate_of_the_metadata_models_reads_out_of_fold_predictions(trained):
    data_root, _mirror, _summary, _uri = trained
    oof = table(data_root, "cross_validated_predictions")
    splits = table(data_root, "labeled_splits").drop_duplicates("case_id")
    train_val = splits[splits["split"].astype(str).isin(["train", "val"])]
    # Per metadata model (the supervised one and its self-trained twin): every train+val case scored exactly
    # once; a duplicate group never spans two folds.
    assert set(oof["model"]) == {"metadata_model", "metadata_model_self_trained"}
    for _model, part in oof.groupby("model"):
        assert sorted(part["case_id"].astype(str)) == sorted(train_val["case_id"].astype(str))
    assert set(oof["fold"]) == {0, 1, 2} and (oof.groupby("group_id")["fold"].nunique() == 1).all()
    gates = table(data_root, "fairness_gates").set_index("model")
    for model in ("metadata_model", "metadata_model_self_trained"):
        assert gates.loc[model, "source"].startswith("out-of-fold predictions, 3-fold"), model
    assert gates.loc["multimodal", "source"].startswith("test split")
    assert set(gates["status"]) <= {"passed", "failed", "not_judged"}
    estimates = table(data_root, "fairness_gate_estimates")
    cv_n = estimates[(estimates["model"] == "metadata_model") & (estimates["attribute"] == "overall")]["n"].iloc[0]
    assert cv_n == len(train_val)


def test_rerun_with_unchanged_inputs_trains_nothing_and_opens_no_mlflow_run(trained):
    data_root, mirror, _summary, uri = trained
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = {r.info.run_id for r in client.search_runs(experiments)}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        again = run_pipeline(
            data_root=data_root,
            source=str(mirror.root),
            log_level="WARNING",
            run_config=RUN_CONFIG,
            select="key:baseline_cnn or key:metadata_model",
        )
    assert again.success, again.render()
    after = {r.info.run_id for r in client.search_runs(experiments)}
    assert after == before
    assert table(data_root, "baseline_cnn")["reused"].iloc[0]
    assert table(data_root, "metadata_model")["reused"].iloc[0]
    # A reused run's materialisation shows what the run recorded: the same curves and figures.
    reused = latest_metadata(data_root, "baseline_cnn")
    assert reused["reused_finished_run"].value is True
    assert reused["training_curves"].md_str.startswith("![baseline_cnn training curves](data:image/png;base64,")
    assert reused["best_val_macro_f1"].value == pytest.approx(
        client.get_run(table(data_root, "baseline_cnn")["mlflow_run_id"].iloc[0]).data.metrics["best_val_score"]
    )
    assert "best_val_balanced_accuracy" in latest_metadata(data_root, "metadata_model")


def test_only_stale_rerun_launches_nothing_when_everything_is_up_to_date(trained):
    data_root, mirror, _summary, uri = trained
    from scin_pipeline.runner import stale_asset_keys

    assert stale_asset_keys(data_root, str(mirror.root)) == []
    client = mlflow.MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    before = {r.info.run_id for r in client.search_runs(experiments)}
    again = run_pipeline(
        data_root=data_root, source=str(mirror.root), log_level="WARNING", run_config=RUN_CONFIG, only_stale=True
    )
    assert again.success and not again.materialized
    assert {r.info.run_id for r in client.search_runs(experiments)} == before
