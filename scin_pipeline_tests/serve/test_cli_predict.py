"""``scin-pipeline predict`` in-process, on folders of SYNTHETIC photos (good, tiny, unreadable, corrupt,
truncated) against the tiny models of the serving registry (conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scin_pipeline.cli import EXIT_FAILED, EXIT_SKIPPED_FILES, EXIT_USAGE, main
from scin_pipeline.core.image_cache import preprocess_image_bytes
from scin_pipeline.serve.file_prediction import PathsError, find_images, read_answers
from scin_pipeline.serve.inputs import PredictionRequest
from scin_pipeline.serve.model import load_served_model
from scin_pipeline_tests.serve.conftest import CLASSES, IMAGE_SIZE, MODEL_NAME, encode, synthetic_skin_rgb

CHAMPION = f"models:/{MODEL_NAME}@champion"


@pytest.fixture(autouse=True)
def _no_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture()
def photos(tmp_path) -> Path:
    """Three good photos (one JPEG with an upper-case suffix, two levels down), a small one, a speck under
    16 px, a corrupt file, a truncated PNG, an unreadable one (see the test) and a text file."""
    folder = tmp_path / "photos"
    write(folder / "a.png", encode(synthetic_skin_rgb(0, (200, 160))))
    write(folder / "sub" / "b.JPG", encode(synthetic_skin_rgb(1, (180, 240)), "JPEG"))
    write(folder / "sub" / "deeper" / "c.png", encode(synthetic_skin_rgb(2, (220, 200))))
    write(folder / "small.png", encode(synthetic_skin_rgb(3, (48, 40))))
    write(folder / "speck.png", encode(synthetic_skin_rgb(4, (8, 8))))
    write(folder / "broken.png", b"this is not an image at all" * 10)
    write(folder / "cut.png", encode(synthetic_skin_rgb(5, (200, 160)))[:300])
    write(folder / "locked.png", encode(synthetic_skin_rgb(6, (200, 160))))
    write(folder / "notes.txt", b"not an image, not looked at")
    return folder


def refuse_to_read(monkeypatch, name: str) -> None:
    """Reading ``name`` fails as an unreadable file does (tests run as root here, so chmod would not)."""
    original = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_a_folder_is_classified_file_by_file_and_unreadable_files_are_reported(
    registry, photos, tmp_path, monkeypatch, capsys
):
    refuse_to_read(monkeypatch, "locked.png")
    out = tmp_path / "predictions.csv"
    root = ["--data-root", str(registry.data_root)]
    code = main(["predict", str(photos), *root, "--out", str(out), "--batch-size", "3"])
    assert code == EXIT_SKIPPED_FILES
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    expected_paths = [
        photos / name
        for name in (
            "a.png",
            "broken.png",
            "cut.png",
            "locked.png",
            "small.png",
            "speck.png",
            "sub/b.JPG",
            "sub/deeper/c.png",
        )
    ]
    assert list(rows.index) == [str(p) for p in expected_paths]  # notes.txt is not an image suffix
    errors = rows[rows["status"] == "error"]
    assert errors["error"].to_dict() == {
        str(photos / "broken.png"): "corrupt",
        str(photos / "cut.png"): "truncated",
        str(photos / "locked.png"): "unreadable",
        str(photos / "speck.png"): "too_small",
    }
    for path, detail in errors["error_detail"].items():
        assert detail.startswith(path), detail  # the message names the file
    assert (errors[[f"probability_{c}" for c in CLASSES]] == "").all().all()

    classified = rows[rows["status"] == "ok"]
    assert len(classified) == 4
    probabilities = classified[[f"probability_{c}" for c in CLASSES]].astype(float)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    assert classified.loc[str(photos / "small.png"), "quality_verdict"] == "warning"
    assert "too_small" in classified.loc[str(photos / "small.png"), "quality_issues"]
    assert classified.loc[str(photos / "a.png"), ["width", "height"]].astype(int).tolist() == [200, 160]
    assert (classified["model_version"].astype(str) == registry.versions["keras_image"]).all()
    assert (classified["model_uri"] == registry.uri("keras_image")).all()
    assert (classified["notice"] == "NOT A DIAGNOSIS; model trained on SYNTHETIC images").all()

    # The served model's own numbers for the same bytes: calibrated, ranked as the service ranks them.
    served = load_served_model(CHAMPION, tracking_uri=registry.tracking_uri)
    for name in ("a.png", "sub/b.JPG"):
        image = preprocess_image_bytes((photos / name).read_bytes(), IMAGE_SIZE)[None]
        direct = served.predict_proba(image, pd.DataFrame(index=[0]))[0]
        np.testing.assert_allclose(probabilities.loc[str(photos / name)], direct, rtol=1e-6, atol=1e-7)
        assert classified.loc[str(photos / name), "top1"] == CLASSES[int(np.argmax(direct))]
    assert served.package.calibration is not None
    assert (classified["calibrated"].astype(str) == "True").all()
    np.testing.assert_allclose(classified["temperature"].astype(float), served.package.calibration.temperature)

    err = capsys.readouterr().err
    assert "classified 4 of 8 image(s)" in err
    assert "skipped 4 file(s)" in err and str(out) in err
    assert "NOT A DIAGNOSIS" in err and "SYNTHETIC" in err


def test_files_named_one_by_one_batch_size_does_not_change_the_answer_and_a_pinned_version_is_used(
    registry, photos, tmp_path
):
    files = [str(photos / "a.png"), str(photos / "sub" / "deeper" / "c.png"), str(photos / "a.png")]
    outputs = {}
    for batch_size in ("1", "32"):
        out = tmp_path / f"batch{batch_size}.csv"
        code = main(
            ["predict", *files, "--data-root", str(registry.data_root), "--out", str(out), "--batch-size", batch_size]
        )
        assert code == 0
        outputs[batch_size] = pd.read_csv(out)
    assert list(outputs["1"]["path"]) == sorted({files[0], files[1]})  # each file once
    columns = [f"probability_{c}" for c in CLASSES]
    np.testing.assert_allclose(outputs["1"][columns], outputs["32"][columns], rtol=1e-5, atol=1e-6)

    out = tmp_path / "multimodal.csv"
    multimodal = registry.uri("keras_multimodal")
    root = ["--data-root", str(registry.data_root)]
    assert main(["predict", files[0], "--model", multimodal, *root, "--out", str(out)]) == 0
    row = pd.read_csv(out).iloc[0]
    assert str(row["model_version"]) == registry.versions["keras_multimodal"] and row["model_uri"] == multimodal
    assert not bool(row["calibrated"])  # this version carries no temperature, and the row says so


def test_the_pixel_cap_is_checked_on_the_header_before_decoding(registry, photos, tmp_path):
    out = tmp_path / "capped.csv"
    code = main(
        ["predict", str(photos / "a.png"), "--data-root", str(registry.data_root), "--out", str(out)]
        + ["--max-megapixels", "0.01"]
    )
    assert code == EXIT_SKIPPED_FILES
    row = pd.read_csv(out).iloc[0]
    assert row["error"] == "too_many_pixels" and "200 x 160 = 32,000 pixels" in row["error_detail"]


def test_bad_paths_models_and_stores_are_one_line_errors_that_write_nothing(registry, photos, tmp_path, capsys):
    out = tmp_path / "never.csv"
    data_root = ["--data-root", str(registry.data_root), "--out", str(out)]
    assert main(["predict", str(tmp_path / "nowhere"), *data_root]) == EXIT_USAGE
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), *data_root]) == EXIT_USAGE
    assert "no image files" in capsys.readouterr().err
    metadata_only = registry.uri("sklearn_metadata")
    assert main(["predict", str(photos), "--model", metadata_only, *data_root]) == EXIT_FAILED
    assert "questionnaire only" in capsys.readouterr().err
    assert main(["predict", str(photos), "--model", f"models:/{MODEL_NAME}/999", *data_root]) == EXIT_FAILED
    assert "has no version 999" in capsys.readouterr().err
    assert main(["predict", str(photos), "--data-root", str(tmp_path / "untrained"), "--out", str(out)]) == EXIT_USAGE
    assert "no MLflow store" in capsys.readouterr().err
    assert main(["predict", str(photos), *data_root, "--batch-size", "0"]) == EXIT_USAGE
    assert not out.exists()


def test_find_images_keeps_the_given_paths_and_tries_a_named_file_whatever_its_suffix(tmp_path):
    folder = tmp_path / "f"
    write(folder / "x" / "1.jpeg", b"1")
    write(folder / "2.PNG", b"2")
    write(folder / "skip.gif", b"3")
    named = write(tmp_path / "photo.bin", b"4")
    found = find_images([folder, named, folder / "2.PNG"])
    assert found == sorted([folder / "2.PNG", folder / "x" / "1.jpeg", named], key=str)
    with pytest.raises(PathsError, match="no image files"):
        find_images([write(tmp_path / "g" / "a.txt", b"").parent])


ANSWERS = {"age_group": "AGE_40_TO_49", "symptoms": "condition_symptoms_bleeding,condition_symptoms_darkening"}


def test_answers_csv_reaches_a_multimodal_model_per_image_and_an_image_model_ignores_it(
    registry, photos, tmp_path, capsys
):
    a, c = photos / "a.png", photos / "sub" / "deeper" / "c.png"
    answers = tmp_path / "answers.csv"
    # a.png answered (named by another path to the same file); c.png has no row: unanswered.
    other_name = tmp_path / ".." / tmp_path.name / "photos" / "a.png"
    pd.DataFrame([{"path": str(other_name), **ANSWERS, "sex_at_birth": ""}]).to_csv(answers, index=False)
    root = ["--data-root", str(registry.data_root)]
    multimodal = registry.uri("keras_multimodal")
    out = tmp_path / "answered.csv"
    assert (
        main(["predict", str(a), str(c), "--model", multimodal, *root, "--answers", str(answers), "--out", str(out)])
        == 0
    )
    rows = pd.read_csv(out).set_index("path")
    assert rows["questionnaire"].to_dict() == {str(a): "answered", str(c): "blank"}
    served = load_served_model(multimodal, tracking_uri=registry.tracking_uri)
    columns = [f"probability_{k}" for k in CLASSES]
    for path, request in (
        (a, PredictionRequest(None, {"age_group": ANSWERS["age_group"], "symptoms": ANSWERS["symptoms"].split(",")})),
        (c, PredictionRequest(None)),
    ):
        image = preprocess_image_bytes(path.read_bytes(), IMAGE_SIZE)[None]
        direct = served.predict_proba(image, request.cases())[0]
        np.testing.assert_allclose(rows.loc[str(path), columns].astype(float), direct, rtol=1e-5, atol=1e-6)
    blank = served.predict_proba(
        preprocess_image_bytes(a.read_bytes(), IMAGE_SIZE)[None], PredictionRequest(None).cases()
    )[0]
    assert not np.allclose(rows.loc[str(a), columns].astype(float), blank, atol=1e-6)  # the answers changed it

    # The image model reads no questionnaire: the rows say so, and so does stderr.
    capsys.readouterr()
    out = tmp_path / "image_only.csv"
    assert main(["predict", str(a), *root, "--answers", str(answers), "--out", str(out)]) == 0
    assert (pd.read_csv(out)["questionnaire"] == "not used").all()
    assert "not used" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"file": "a.png"}], "no `path` column"),
        ([{"path": "{a}", "itching": "yes"}], "unknown column(s) ['itching']"),
        ([{"path": "{a}", "age_group": "AGE_1000"}], "line 2: age_group: 'AGE_1000' is not one of"),
        ([{"path": "{a}"}, {"path": "{photos}/nowhere.png"}], "line 3: "),
        ([{"path": "{a}"}, {"path": "{a}"}], "line 3: "),
        ([{"path": "{a}", "textures": "textures_flat,textures_shiny"}], "textures: ['textures_shiny'] not among"),
    ],
)
def test_answers_csv_problems_are_one_line_usage_errors_naming_the_line(
    registry, photos, tmp_path, capsys, rows, message
):
    answers = tmp_path / "answers.csv"
    fill = {"a": str(photos / "a.png"), "photos": str(photos)}
    pd.DataFrame([{k: v.format(**fill) for k, v in row.items()} for row in rows]).to_csv(answers, index=False)
    out = tmp_path / "never.csv"
    code = main(
        [
            "predict",
            str(photos / "a.png"),
            "--data-root",
            str(registry.data_root),
            "--answers",
            str(answers),
            "--out",
            str(out),
        ]
    )
    assert code == EXIT_USAGE and not out.exists()
    err = capsys.readouterr().err
    assert str(answers) in err and message in err, err


def test_read_answers_says_why_a_path_is_refused(tmp_path):
    image = write(tmp_path / "p" / "1.png", b"x")
    answers = tmp_path / "answers.csv"
    answers.write_text(f"path,age_group\n{image},AGE_18_TO_29\n{tmp_path / 'p' / '2.png'},\n")
    with pytest.raises(PathsError, match=r"line 3: .*2\.png' is not among the images to classify"):
        read_answers(answers, [image])
    answers.write_text(f"path,age_group\n{image},AGE_18_TO_29\n{image},\n")
    with pytest.raises(PathsError, match="line 3: .* has answers on an earlier line too"):
        read_answers(answers, [image])
    answers.write_text(f"path,age_group\n{image},AGE_18_TO_29\n")
    assert read_answers(answers, [image]) == {image: PredictionRequest(None, {"age_group": "AGE_18_TO_29"})}
    with pytest.raises(PathsError, match="absent.csv"):
        read_answers(tmp_path / "absent.csv", [image])
