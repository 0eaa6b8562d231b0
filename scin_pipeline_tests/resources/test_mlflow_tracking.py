"""MlflowTracking on a SQLite store under tmp_path: tagging, artifacts' location, resumed runs, the registry's
champion alias, and prediction from the registry in a fresh process. Models are tiny and synthetic."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import PIL.Image
import pytest
from dagster import AssetExecutionContext, asset, materialize
from sklearn.linear_model import LogisticRegression

from scin_pipeline.core import schema
from scin_pipeline.core.image_cache import preprocess_image_bytes
from scin_pipeline.core.metadata_model import METADATA_FEATURE_COLUMNS, metadata_features
from scin_pipeline.core.packaged_model import PackagedClassifier
from scin_pipeline.resources import StoragePaths
from scin_pipeline.resources.mlflow_tracking import MlflowTracking, config_hash, dagster_tags, run_key_for

CLASSES = ["Eczema", "Psoriasis", "Urticaria"]
PARAMS = {"C": 0.1, "epochs": 2, "layers": [8, 4]}


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> MlflowTracking:
    # MLflow's default artifact root is ./mlruns: working in tmp_path lets the test see any stray folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return MlflowTracking(storage=StoragePaths(data_root=str(tmp_path / "data")))


def synthetic_cases(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    ages = np.array(schema.ENUM_VALUES["age_group"][:3])
    return pd.DataFrame({"age_group": ages[y], schema.SYMPTOM_COLUMNS[0]: y == 1}), y


def metadata_package(folder: Path, C: float = 1.0) -> Path:
    cases, y = synthetic_cases(60)
    model = LogisticRegression(C=C, max_iter=500).fit(metadata_features(cases).to_numpy(), y)
    return PackagedClassifier(
        kind="sklearn_metadata", classes=CLASSES, model=model, metadata_columns=list(METADATA_FEATURE_COLUMNS)
    ).save(folder)


def keras_image_package(folder: Path) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    image = keras.Input((16, 16, 3), dtype="uint8", name="image")
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(image))
    out = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return PackagedClassifier(kind="keras_image", classes=CLASSES, model=keras.Model(image, out), image_size=16).save(
        folder
    )


def synthetic_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def tags_for(candidate: str, dagster_run_id: str = "dagster-run-1") -> dict[str, str]:
    return {"dagster.run_id": dagster_run_id, "dagster.asset_key": candidate, "scin.candidate": candidate}


def runs_in_experiment(tracking: MlflowTracking) -> list:
    client = tracking.client()
    return list(client.search_runs([tracking.experiment_id(client)]))


# ------------------------------------------------------------------------------------------- tagging


def test_a_training_materialisation_is_one_tagged_run_with_params_epochs_and_artifacts(tracking, tmp_path):
    splits_version = "splits-3f2a"

    @asset(code_version="v7")
    def synthetic_candidate(context: AssetExecutionContext, mlflow_tracking: MlflowTracking) -> str:
        tags = dagster_tags(
            context, code_version="v7", splits_data_version=splits_version, synthetic_data=True, keras_backend="jax"
        ) | {"scin.candidate": "synthetic_candidate"}
        key = run_key_for(
            asset_key="synthetic_candidate",
            code_version="v7",
            config=PARAMS,
            splits_data_version=splits_version,
            inputs_version="pixels-1",
        )
        with mlflow_tracking.training_run(run_key=key, run_name="synthetic_candidate", tags=tags, params=PARAMS) as run:
            for epoch, loss in enumerate([0.9, 0.5, 0.4]):
                run.log_epoch(epoch, {"loss": loss, "val_loss": loss + 0.1, "note": "not a number"})
            run.log_metrics({"test_balanced_accuracy": 0.5})
            plot = io.BytesIO()
            PIL.Image.new("RGB", (4, 4)).save(plot, format="PNG")
            run.log_figure_png(plot.getvalue(), "plots/confusion_matrix.png")
            run.log_table(pd.DataFrame({"class": CLASSES, "auc": [0.6, 0.7, 0.8]}), "tables/per_class.csv")
            run.log_text("synthetic images: not a dermatology result", "README.txt")
            (tmp_path / "history.json").write_text("{}")
            run.log_artifact(tmp_path / "history.json", "training")
            context.add_output_metadata(run.metadata())
            return run.run_id

    result = materialize([synthetic_candidate], resources={"mlflow_tracking": tracking})
    run_id = result.output_for_node("synthetic_candidate")
    client = tracking.client()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {
        k: run.data.tags[k]
        for k in (
            "dagster.run_id",
            "dagster.asset_key",
            "dagster.code_version",
            "scin.splits_data_version",
            "scin.keras_backend",
            "scin.synthetic_data",
            "scin.candidate",
        )
    } == {
        "dagster.run_id": result.run_id,
        "dagster.asset_key": "synthetic_candidate",
        "dagster.code_version": "v7",
        "scin.splits_data_version": splits_version,
        "scin.keras_backend": "jax",
        "scin.synthetic_data": "true",
        "scin.candidate": "synthetic_candidate",
    }
    assert run.data.tags["scin.run_key"] == run_key_for(
        asset_key="synthetic_candidate",
        code_version="v7",
        config=PARAMS,
        splits_data_version=splits_version,
        inputs_version="pixels-1",
    )
    assert run.data.params == {"C": "0.1", "epochs": "2", "layers": "[8, 4]"}
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 1.0), (1, 0.6), (2, 0.5)]
    assert "note" not in run.data.metrics

    # Artifacts live under <data_root>/mlflow/artifacts, and nothing appeared in the working directory.
    # Recorded relative to the store's folder (scin_mlflow_store), resolved under the root that reads it.
    from scin_mlflow_store import SCHEME, resolve

    artifact_root = (tmp_path / "data" / "mlflow" / "artifacts").resolve()
    assert run.info.artifact_uri == f"{SCHEME}:/artifacts/scin-pipeline/{run_id}/artifacts"
    run_dir = resolve(run.info.artifact_uri, f"sqlite:///{tmp_path.resolve()}/data/mlflow/mlflow.db")
    assert artifact_root in run_dir.parents
    stored = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    assert stored == ["README.txt", "plots/confusion_matrix.png", "tables/per_class.csv", "training/history.json"]
    assert pd.read_csv(run_dir / "tables/per_class.csv")["class"].tolist() == CLASSES
    assert not (tmp_path / "mlruns").exists()
    assert (tmp_path / "data" / "mlflow" / "mlflow.db").is_file()

    metadata = result.asset_materializations_for_node("synthetic_candidate")[0].metadata
    assert metadata["mlflow_run_id"].value == run_id
    assert metadata["mlflow_experiment_id"].value == run.info.experiment_id


def test_synthetic_flag_and_optional_backend_tag():
    class Context:
        class run:  # noqa: N801 - mimics DagsterRun's API
            run_id = "r1"

        class asset_key:  # noqa: N801 - mimics AssetKey's API
            @staticmethod
            def to_user_string():
                return "models/metadata_model"

    tags = dagster_tags(Context(), code_version="1", splits_data_version="s", synthetic_data=False)
    assert tags == {
        "dagster.run_id": "r1",
        "dagster.asset_key": "models/metadata_model",
        "dagster.code_version": "1",
        "scin.splits_data_version": "s",
        "scin.synthetic_data": "false",
    }


def test_run_keys_are_deterministic_and_checked():
    parts = {
        "asset_key": "baseline_cnn",
        "code_version": "3",
        "config": {"a": 1, "b": 2},
        "splits_data_version": "abc",
        "inputs_version": "p",
    }
    first = run_key_for(**parts)
    assert first == run_key_for(**{**parts, "config": {"b": 2, "a": 1}})  # key order is not content
    changed = [
        {"asset_key": "multimodal"},
        {"code_version": "4"},
        {"config": {"a": 1, "b": 3}},
        {"splits_data_version": "abd"},
        {"inputs_version": "q"},
    ]
    keys = {run_key_for(**{**parts, **change}) for change in changed}
    assert len(keys) == len(changed) and first not in keys  # every part is in the key
    # The recipe itself: stored runs are found again by it, so it must not drift.
    assert first == hashlib.sha256(f"baseline_cnn:3:{config_hash({'a': 1, 'b': 2})}:abc:p".encode()).hexdigest()[:24]
    assert config_hash({"a": 1, "b": 2}) == hashlib.sha256(b'{"a": 1, "b": 2}').hexdigest()[:12]
    tracking = MlflowTracking(storage=StoragePaths(data_root="unused"))
    with pytest.raises(ValueError, match="run_key must be"):
        tracking.runs_with_key("x' OR '1'='1")


def test_the_splits_are_the_runs_input_dataset_and_tags_are_cut_to_mlflows_limit(tracking, tmp_path):
    splits = pd.DataFrame(
        {"image_id": ["1", "2", "3"], "case_id": ["a", "a", "b"], "split": ["train", "train", "val"], "label": "X"}
    )
    source = tmp_path / "data" / "tables" / "labeled_splits.parquet"
    with tracking.training_run(run_key="key-data", run_name="data", tags={}, params={}) as run:
        for _ in range(2):  # a resumed run logs its input again: still one input
            run.log_dataset(splits, name="labeled_splits", digest="splits-3f2a", source=source, context="training")
        run.set_tags({"scin.fairness_status": "passed", "scin.fairness_reason": "x" * 6000})
    stored = tracking.client().get_run(run.run_id)
    (dataset_input,) = stored.inputs.dataset_inputs
    dataset = dataset_input.dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("labeled_splits", "splits-3f2a", "local")
    assert json.loads(dataset.source)["uri"] == str(source)
    assert json.loads(dataset.profile)["num_rows"] == 3
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "training")]
    assert stored.data.tags["scin.fairness_status"] == "passed"
    assert len(stored.data.tags["scin.fairness_reason"]) == 4000
    assert stored.data.tags["scin.fairness_reason"].endswith("...")


def test_artifact_names_may_not_leave_the_run_folder(tracking):
    with tracking.training_run(run_key="k-names", run_name="n", tags={}, params={}) as run:
        with pytest.raises(ValueError, match="relative path"):
            run.log_bytes(b"x", "../outside.txt")
        with pytest.raises(ValueError, match="PNG bytes"):
            run.log_figure_png(b"GIF89a", "plot.png")


# ------------------------------------------------------------------------------------------- resumed runs


KILLED_CHILD = textwrap.dedent("""
    import os, signal, sys
    from scin_pipeline.resources import MlflowTracking, StoragePaths
    tracking = MlflowTracking(storage=StoragePaths(data_root=sys.argv[1]))
    with tracking.training_run(run_key="synthetic-key", run_name="synthetic", params={"C": 0.1},
                               tags={"dagster.run_id": "dagster-run-killed"}) as run:
        run.log_epoch(0, {"loss": 0.9})
        print(run.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup at all, as when the machine or the OOM killer stops us
""")


def test_a_killed_run_is_resumed_not_duplicated(tracking, tmp_path):
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
    )
    assert child.returncode == -9, child.stderr[-2000:]
    killed_run_id = child.stdout.split()[0]
    assert tracking.client().get_run(killed_run_id).info.status == "RUNNING"
    assert tracking.find_finished_run("synthetic-key") is None

    with tracking.training_run(
        run_key="synthetic-key", run_name="synthetic", params={"C": 0.1}, tags={"dagster.run_id": "dagster-run-retry"}
    ) as run:
        assert (run.run_id, run.resumed) == (killed_run_id, True)
        run.log_epoch(1, {"loss": 0.5})
    resumed = tracking.client().get_run(killed_run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["dagster.run_id"] == "dagster-run-retry"
    assert resumed.data.tags["scin.previous_dagster_run_ids"] == "dagster-run-killed"
    assert resumed.data.tags["scin.resume_count"] == "1"
    assert [(m.step, m.value) for m in tracking.client().get_metric_history(killed_run_id, "loss")] == [
        (0, 0.9),
        (1, 0.5),
    ]
    assert [r.info.run_id for r in tracking.runs_with_key("synthetic-key")] == [killed_run_id]
    assert tracking.find_finished_run("synthetic-key").info.run_id == killed_run_id


def test_failed_and_interrupted_runs_are_resumed_and_finished_ones_are_not(tracking):
    with pytest.raises(RuntimeError, match="synthetic failure"):
        with tracking.training_run(run_key="key-a", run_name="a", tags={}, params=PARAMS) as run:
            first_id = run.run_id
            assert run.resumed is False
            raise RuntimeError("synthetic failure")
    assert tracking.client().get_run(first_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):
        with tracking.training_run(run_key="key-a", run_name="a", tags={}, params=PARAMS) as run:
            assert (run.run_id, run.resumed) == (first_id, True)
            raise KeyboardInterrupt
    assert tracking.client().get_run(first_id).info.status == "KILLED"

    with tracking.training_run(run_key="key-a", run_name="a", tags={}, params=PARAMS) as run:
        assert (run.run_id, run.resumed) == (first_id, True)
    assert tracking.find_finished_run("key-a").info.run_id == first_id
    assert tracking.client().get_run(first_id).data.tags["scin.resume_count"] == "2"

    # Another key is another run.
    with tracking.training_run(run_key="key-b", run_name="b", tags={}, params=PARAMS) as run:
        assert run.run_id != first_id and run.resumed is False
    # A finished run is never reopened: training again under its key is a new run (a deliberate retrain).
    with tracking.training_run(run_key="key-a", run_name="a", tags={}, params=PARAMS) as run:
        retrain_id = run.run_id
        assert retrain_id != first_id and run.resumed is False
    assert [r.info.run_id for r in tracking.runs_with_key("key-a")] == [retrain_id, first_id]
    assert len(runs_in_experiment(tracking)) == 3


def test_resuming_with_changed_params_fails_the_run_clearly(tracking):
    with pytest.raises(RuntimeError):
        with tracking.training_run(run_key="key-p", run_name="p", tags={}, params={"C": 1.0}):
            raise RuntimeError("synthetic failure")
    with pytest.raises(ValueError, match=r"different values for parameters.*'C': \('1.0', '2.0'\)"):
        with tracking.training_run(run_key="key-p", run_name="p", tags={}, params={"C": 2.0}):
            pass
    (run,) = tracking.runs_with_key("key-p")
    assert run.info.status == "FAILED" and run.data.params == {"C": "1.0"}


def test_logging_after_the_run_ended_is_an_error(tracking):
    with tracking.training_run(run_key="key-closed", run_name="c", tags={}, params={}) as run:
        pass
    with pytest.raises(RuntimeError, match="has ended"):
        run.log_metrics({"loss": 1.0})


# ------------------------------------------------------------------------------------------- tracking URI


def test_mlflow_tracking_uri_is_honoured_when_no_uri_is_configured(tracking, tmp_path, monkeypatch):
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    assert tracking.resolved_tracking_uri() == elsewhere
    configured = MlflowTracking(
        storage=StoragePaths(data_root=str(tmp_path / "data")), tracking_uri=f"sqlite:///{tmp_path}/own.db"
    )
    assert configured.resolved_tracking_uri() == f"sqlite:///{tmp_path}/own.db"

    with tracking.training_run(run_key="key-env", run_name="env", tags={}, params={}) as run:
        pass
    assert mlflow.MlflowClient(elsewhere).get_run(run.run_id).info.status == "FINISHED"
    assert (tmp_path / "elsewhere" / "store.db").is_file()
    assert not (tmp_path / "data" / "mlflow" / "mlflow.db").exists()
    # The fluent URI was set only for the block: the environment and MLflow's global URI are as before.
    assert os.environ["MLFLOW_TRACKING_URI"] == elsewhere


def test_the_global_tracking_uri_does_not_leak_out_of_a_run(tracking, monkeypatch):
    before = mlflow.get_tracking_uri()
    with tracking.training_run(run_key="key-leak", run_name="leak", tags={}, params={}):
        assert mlflow.get_tracking_uri() == tracking.resolved_tracking_uri()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == before
    assert mlflow.active_run() is None


# ------------------------------------------------------------------------------------------- registry


def test_models_are_registered_with_lineage_tags_and_the_champion_alias_moves(tracking, tmp_path):
    assert tracking.champion_version() is None
    versions = {}
    for C in (1.0, 0.01):
        candidate = f"logistic_C{C}"
        with tracking.training_run(
            run_key=f"key-{candidate}", run_name=candidate, tags=tags_for(candidate), params={"C": C}
        ) as run:
            model_uri, version = run.log_model(metadata_package(tmp_path / candidate, C=C))
            metadata = run.metadata()
        assert model_uri.startswith("models:/m-")
        assert metadata["mlflow_model_uri"] == model_uri
        assert metadata["mlflow_registered_model"] == f"models:/scin-condition-classifier/{version}"
        versions[candidate] = version
    assert sorted(versions.values()) == ["1", "2"]

    client = tracking.client()
    second = client.get_model_version("scin-condition-classifier", versions["logistic_C0.01"])
    assert {k: second.tags[k] for k in ("scin.candidate", "scin.model_kind", "scin.run_key", "dagster.run_id")} == {
        "scin.candidate": "logistic_C0.01",
        "scin.model_kind": "sklearn_metadata",
        "scin.run_key": "key-logistic_C0.01",
        "dagster.run_id": "dagster-run-1",
    }
    assert not (tmp_path / "mlruns").exists()

    tracking.set_champion(versions["logistic_C0.01"], reason="highest val macro-F1 (synthetic)")
    champion = tracking.champion_version()
    assert str(champion.version) == versions["logistic_C0.01"]
    assert champion.tags["scin.champion_reason"] == "highest val macro-F1 (synthetic)"
    assert tracking.model_uri_for_alias() == "models:/scin-condition-classifier@champion"

    tracking.set_champion(versions["logistic_C1.0"], reason="moved back (synthetic)")
    assert str(tracking.champion_version().version) == versions["logistic_C1.0"]
    with pytest.raises(mlflow.exceptions.MlflowException, match="not found"):
        tracking.set_champion(99, reason="no such version")
    with pytest.raises(ValueError, match="reason"):
        tracking.set_champion(versions["logistic_C1.0"], reason=" ")
    assert str(tracking.champion_version().version) == versions["logistic_C1.0"]


def test_clearing_the_champion_removes_the_alias_and_keeps_the_reason(tracking, tmp_path):
    from scin_pipeline.resources.mlflow_tracking import CHAMPION_CLEARED_REASON_TAG

    # Before anything is registered: the model is created so that the reason has a place to live.
    assert tracking.clear_champion(reason="nothing trained passed") is None
    assert tracking.champion_cleared_reason()[0] == "nothing trained passed"
    with tracking.training_run(run_key="key-clear", run_name="clear", tags=tags_for("clear"), params={}) as run:
        _, version = run.log_model(metadata_package(tmp_path / "clear"))
    tracking.set_champion(version, reason="the only candidate")
    assert tracking.champion_cleared_reason() is None

    previous = tracking.clear_champion(reason="fairness gate failed for every candidate")
    assert str(previous.version) == version
    assert tracking.champion_version() is None
    reason, cleared_at = tracking.champion_cleared_reason()
    assert reason == "fairness gate failed for every candidate"
    assert pd.Timestamp(cleared_at).tzinfo is not None
    version_tags = tracking.client().get_model_version("scin-condition-classifier", version).tags
    assert version_tags[CHAMPION_CLEARED_REASON_TAG].endswith(reason)
    # Clearing again (no alias left) only updates the reason.
    assert tracking.clear_champion(reason="still none") is None
    assert tracking.champion_cleared_reason()[0] == "still none"
    with pytest.raises(ValueError, match="reason"):
        tracking.clear_champion(reason="  ")


# The child makes the installed scin_pipeline unreachable before it imports anything of ours: it drops every
# import finder that can find the package (the editable install's finder maps it to the repository) and every
# sys.path entry that holds it, and checks that nothing finds it any more. What it then imports can only come
# from a model's code/ folder, which MLflow puts first on sys.path when it loads the model.
FRESH_PROCESS = textwrap.dedent("""
    import importlib.util, json, sys
    from importlib.machinery import PathFinder
    from pathlib import Path

    def finds_package(finder):
        try:
            return finder.find_spec("scin_pipeline", None) is not None
        except Exception:
            return False

    # The store's artifact plugin stays (the data root's store names its artifacts relative to itself, see
    # scin_mlflow_store: a standalone module, installed beside MLflow by whoever opens such a store).
    import scin_mlflow_store
    sys.meta_path = [f for f in sys.meta_path if f is PathFinder or not finds_package(f)]
    sys.path = [p for p in sys.path if not (Path(p or ".") / "scin_pipeline").exists()]
    assert importlib.util.find_spec("scin_pipeline") is None, "the installed package is still importable"

    import mlflow.pyfunc
    import pandas as pd
    out = {}

    class NoKeras:
        # The metadata-only model's requirements leave Keras and its backends out: it must run without them.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"keras", "tensorflow", "jax", "torch"}:
                raise ImportError(f"{name} is blocked: a metadata-only model must not import it")
            return None

    sys.meta_path.insert(0, NoKeras())
    metadata_model = mlflow.pyfunc.load_model(sys.argv[1])
    out["metadata"] = metadata_model.predict(pd.DataFrame(json.loads(sys.argv[3]))).to_dict(orient="split")
    sys.meta_path = [f for f in sys.meta_path if not isinstance(f, NoKeras)]
    images = [bytes.fromhex(h) for h in json.loads(sys.argv[2])]
    champion = mlflow.pyfunc.load_model("models:/scin-condition-classifier@champion")
    out["champion"] = champion.predict(pd.DataFrame({"image": images})).to_dict(orient="split")
    import scin_pipeline.core.packaged_model as loaded
    out["code"] = [m.__file__ for name, m in sys.modules.items() if name.startswith("scin_pipeline")]
    out["pyfunc_file"] = loaded.__file__
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture
def registered_champion(tracking, tmp_path) -> dict[str, str]:
    """A metadata model and an image model registered, the image model champion: their version numbers."""
    with tracking.training_run(
        run_key="key-metadata", run_name="metadata", tags=tags_for("metadata"), params={}
    ) as run:
        _, metadata_version = run.log_model(metadata_package(tmp_path / "metadata_pkg"))
    with tracking.training_run(run_key="key-image", run_name="image", tags=tags_for("image"), params={}) as run:
        _, image_version = run.log_model(keras_image_package(tmp_path / "image_pkg"))
    tracking.set_champion(image_version, reason="synthetic test: the image model")
    assert metadata_version and image_version
    return {"metadata": metadata_version, "image": image_version}


def outside_the_repository_env(tracking: MlflowTracking) -> dict[str, str]:
    """This environment without PYTHONPATH, pointed at the test's store, with the venv's scripts on PATH
    (MLflow's scoring server execs `uvicorn` by name, as it would in an activated environment)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking.resolved_tracking_uri()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def test_the_champion_loads_and_predicts_outside_the_repository_from_its_logged_code(
    tracking, tmp_path, registered_champion
):
    images = [synthetic_png(seed) for seed in range(2)]
    cases = {"age_group": schema.ENUM_VALUES["age_group"][:3], "sex_at_birth": ["MALE", None, "FEMALE"]}
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_PROCESS,
            f"models:/scin-condition-classifier/{registered_champion['metadata']}",
            json.dumps([image.hex() for image in images]),
            json.dumps(cases),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=outside_the_repository_env(tracking),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.split("RESULT", 1)[1])
    for name, rows in (("metadata", 3), ("champion", 2)):
        frame = result[name]
        assert frame["columns"] == CLASSES
        probabilities = np.array(frame["data"])
        assert probabilities.shape == (rows, len(CLASSES))
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    # Every scin_pipeline module the child ran came from a logged model's code/ folder, none from the repository.
    repository = Path(__file__).resolve().parents[2]
    assert result["code"] and Path(result["pyfunc_file"]).parts[-4:] == (
        "code",
        "scin_pipeline",
        "core",
        "packaged_model.py",
    )
    for file in result["code"]:
        assert "code" in Path(file).parts and not Path(file).resolve().is_relative_to(repository), file
    # The registry's models give the same numbers as the packages they were made from.
    expected = PackagedClassifier.load(tmp_path / "metadata_pkg").predict_proba(cases=pd.DataFrame(cases))
    np.testing.assert_allclose(np.array(result["metadata"]["data"]), expected, rtol=1e-6)
    assert not (tmp_path / "mlruns").exists()


def test_registered_models_declare_inputs_an_example_and_complete_pinned_requirements(
    tracking, registered_champion, monkeypatch
):
    from importlib import metadata as importlib_metadata

    from mlflow.models import Model

    from scin_pipeline.core.metadata_model import QUESTIONNAIRE_CHOICE_COLUMNS, QUESTIONNAIRE_FLAG_COLUMNS

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.resolved_tracking_uri())  # the registry's too
    for name, version in registered_champion.items():
        local = Path(mlflow.artifacts.download_artifacts(f"models:/scin-condition-classifier/{version}"))
        model = Model.load(local / "MLmodel")
        inputs = {spec.name: (spec.type.name, spec.required) for spec in model.signature.inputs.inputs}
        assert inputs["image"] == ("binary", name == "image")  # optional for the metadata-only model
        questionnaire = {c: ("boolean", False) for c in QUESTIONNAIRE_FLAG_COLUMNS}
        questionnaire |= {c: ("string", False) for c in QUESTIONNAIRE_CHOICE_COLUMNS}
        assert {c: inputs[c] for c in questionnaire} == questionnaire
        assert set(inputs) == {"image", *questionnaire}
        assert model.signature.outputs.input_names() == CLASSES
        example = model.load_input_example(str(local))
        assert example["image"].iloc[0][:8] == b"\x89PNG\r\n\x1a\n"
        requirements = (local / "requirements.txt").read_text().split()
        pinned = dict(line.split("==") for line in requirements)
        wanted = {"mlflow", "numpy", "pandas", "pillow", "opencv-python-headless", "scikit-learn", "cloudpickle"}
        keras_stack = {"keras", "tensorflow-cpu"}
        wanted |= keras_stack if name == "image" else set()
        assert wanted <= set(pinned), requirements
        if name == "metadata":  # a scikit-learn model: no Keras, no backend to install where it is served
            assert not keras_stack & set(pinned) and not {"tensorflow", "jax", "torch"} & set(pinned), requirements
        assert all(pinned[d] == importlib_metadata.version(d) for d in wanted)
        shipped = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*.py"))
        assert "scin_pipeline/core/packaged_model.py" in shipped and "scin_pipeline/definitions.py" not in shipped
        assert not any(p.startswith("scin_pipeline/data") for p in (str(q) for q in (local / "code").rglob("*")))


def test_logging_a_model_leaves_sys_path_as_it_was(tracking, tmp_path):
    # MLflow checks the input example by loading the model, which prepends its (temporary) code/ folder.
    before = list(sys.path)
    with tracking.training_run(run_key="key-path", run_name="path", tags=tags_for("path"), params={}) as run:
        run.log_model(metadata_package(tmp_path / "metadata_pkg"), register=False)
    assert sys.path == before


def free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations_with_one_probability_per_condition(
    tracking, tmp_path, registered_champion
):
    import base64
    import signal
    import time
    import urllib.error
    import urllib.request

    port = free_loopback_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/scin-condition-classifier@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=outside_the_repository_env(tracking),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the scoring server's workers stop with it
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)
        images = [synthetic_png(seed) for seed in range(2)]
        body = {
            "dataframe_split": {
                "columns": ["image", "age_group"],
                "data": [[base64.b64encode(image).decode(), "AGE_18_TO_29"] for image in images],
            }
        }
        request = urllib.request.Request(
            f"{base}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            predictions = json.loads(answer.read())["predictions"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
        log.close()
    assert len(predictions) == len(images)
    for row in predictions:
        assert list(row) == CLASSES
        assert sum(row.values()) == pytest.approx(1.0, abs=1e-6)
    expected = PackagedClassifier.load(tmp_path / "image_pkg").predict_proba(
        images=np.stack([preprocess_image_bytes(image, 16) for image in images])
    )
    np.testing.assert_allclose([[row[c] for c in CLASSES] for row in predictions], expected, rtol=1e-5)


def test_run_links_use_the_ui_url_or_an_http_tracking_uri_without_credentials(tracking, monkeypatch):
    monkeypatch.delenv("SCIN_MLFLOW_UI_URL", raising=False)
    assert tracking.run_url("abc", experiment_id="1") is None  # SQLite: no UI address is known
    # The UI `scin-pipeline ui` started (or compose publishes) is announced in the environment.
    monkeypatch.setenv("SCIN_MLFLOW_UI_URL", "http://127.0.0.1:5001")
    assert tracking.run_url("abc", experiment_id="1") == "http://127.0.0.1:5001/#/experiments/1/runs/abc"
    with_ui = MlflowTracking(storage=StoragePaths(data_root="unused"), ui_url="http://127.0.0.1:5000/")
    assert with_ui.run_url("abc", experiment_id="1") == "http://127.0.0.1:5000/#/experiments/1/runs/abc"  # field first
    monkeypatch.delenv("SCIN_MLFLOW_UI_URL")
    server = MlflowTracking(
        storage=StoragePaths(data_root="unused"), tracking_uri="https://user:secret@mlflow.example:8443"
    )
    assert server.run_url("abc", experiment_id="2") == "https://mlflow.example:8443/#/experiments/2/runs/abc"
