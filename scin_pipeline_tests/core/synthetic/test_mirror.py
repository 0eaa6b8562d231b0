"""Behaviour of the synthetic SCIN mirror: layout, verbatim metadata, determinism, planted defects, image signal.

Tests using the `real_metadata_dir` fixture read the real SCIN CSVs (the bundled copy; SCIN_METADATA_DIR
overrides); the others generate their own metadata.
"""

from __future__ import annotations

import ast
import hashlib
import struct
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from scin_pipeline.core import schema
from scin_pipeline.core.paths import image_id_from_path
from scin_pipeline.core.synthetic.defects import DARK_DIAGNOSTIC_MAX_MEAN, DEFECT_KINDS
from scin_pipeline.core.synthetic.lesions import NONSPECIFIC_PATTERN, render_skin_image
from scin_pipeline.core.synthetic.metadata import SYNTHETIC_CONDITION_COUNTS, select_case_ids, top_condition
from scin_pipeline.core.synthetic.mirror import MARKER_FILE, PLANTS_FILE, SyntheticMirror, write_synthetic_mirror

SMALL = (96, 72)
KNOWN_MISSING = "dataset/images/-2243186711511406658.png"


# ------------------------------------------------------------------------------------------------ helpers


def _read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _image_refs(cases: pd.DataFrame) -> list[tuple[str, str]]:
    """(case_id, path) for every non-empty image reference, in file order."""
    return [
        (row.case_id, p)
        for row in cases.itertuples()
        for p in (row.image_1_path, row.image_2_path, row.image_3_path)
        if p
    ]


def _image_path(root: Path, image_id: str) -> Path:
    return root / "dataset" / "images" / f"{image_id}.png"


def _load_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, f"{path} did not decode"
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _red_contrast(rgb: np.ndarray) -> float:
    """How far the reddest 1 % of pixels stand above the typical pixel in redness (R minus mean of G, B)."""
    f = rgb.astype(np.float64)
    redness = f[..., 0] - (f[..., 1] + f[..., 2]) / 2
    return float(np.percentile(redness, 99) - np.median(redness))


def _laplacian_var(rgb: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _ids_of(plants: pd.DataFrame, kind: str) -> list[str]:
    return plants.loc[plants["planted"] == kind, "image_id"].tolist()


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> SyntheticMirror:
    """A mirror with generated metadata: 120 cases (> 60 files, so every defect kind is planted)."""
    return write_synthetic_mirror(tmp_path_factory.mktemp("generated"), n_cases=120, seed=7, image_size=SMALL)


@pytest.fixture(scope="module")
def real_metadata_dir(scin_metadata_dir) -> Path:
    """The real SCIN CSVs: the shared fixture (the bundled copy; SCIN_METADATA_DIR overrides)."""
    return scin_metadata_dir


@pytest.fixture(scope="module")
def real_mirror(real_metadata_dir, tmp_path_factory) -> SyntheticMirror:
    return write_synthetic_mirror(
        tmp_path_factory.mktemp("real"), metadata_dir=real_metadata_dir, n_cases=120, seed=3, image_size=SMALL
    )


# ------------------------------------------------------------------------------------------------ pure rules


# ------------------------------------------------------------------------------------------------ generated metadata


def test_generated_mirror_layout_and_marker(generated):
    root = generated.root
    for rel in ("dataset/scin_cases.csv", "dataset/scin_labels.csv", MARKER_FILE, PLANTS_FILE):
        assert (root / rel).is_file(), rel
    marker = (root / MARKER_FILE).read_text()
    assert "SYNTHETIC" in marker and "not SCIN photographs" in marker and "NO medical meaning" in marker
    assert "Seed: 7." in marker and "synthetic metadata generated" in marker
    counts = generated.plants["planted"].value_counts()
    for kind in DEFECT_KINDS:
        assert f"| `{kind}` | {counts[kind]} |" in marker
    written = [p for p in (root / "dataset" / "images").iterdir()]
    assert not list(root.rglob(".tmp-*"))  # every file went through core.atomic and landed
    assert generated.n_files_written == len(written)
    assert all(p.suffix == ".png" for p in written)
    on_disk = pd.read_csv(root / PLANTS_FILE, dtype=str, keep_default_na=False)
    assert on_disk["image_id"].tolist() == generated.plants["image_id"].tolist()
    assert on_disk["planted"].tolist() == generated.plants["planted"].tolist()


def test_generated_metadata_matches_the_real_formats(generated):
    cases = _read_csv(generated.root / "dataset" / "scin_cases.csv")
    labels = _read_csv(generated.root / "dataset" / "scin_labels.csv")
    assert list(cases.columns) == schema.CASES_COLUMNS and list(labels.columns) == schema.LABELS_COLUMNS
    assert len(cases) == len(labels) == generated.n_cases == 120
    assert cases["case_id"].tolist() == labels["case_id"].tolist()
    assert cases["case_id"].is_unique
    assert all(-(2**63) <= int(c) < 2**63 and str(int(c)) == c for c in cases["case_id"])
    assert set(cases["release"]) == {"1.0.0-synthetic"}
    for path in cases[["image_1_path", "image_2_path", "image_3_path"]].to_numpy().ravel():
        if path:
            image_id_from_path(path)
    assert (cases["image_1_path"] != "").all()
    assert set(cases["image_1_shot_type"]) <= {"CLOSE_UP", "AT_AN_ANGLE", "AT_DISTANCE"}
    assert set(cases["textures_raised_or_bumpy"]) <= {"YES", ""}
    assert set(cases["fitzpatrick_skin_type"]) <= {"", "NONE_IDENTIFIED"} | {f"FST{i}" for i in range(1, 7)}
    assert set(labels["monk_skin_tone_label_us"]) <= {str(i) for i in range(1, 11)}

    unlabelled = labels["weighted_skin_condition_label"] == "{}"
    assert 0.45 <= 1 - unlabelled.mean() <= 0.75
    u = labels[unlabelled]
    assert set(u["dermatologist_skin_condition_on_label_name"]) == {"[]"}
    assert set(u["dermatologist_skin_condition_confidence"]) == {"[]"}
    assert set(u["dermatologist_gradable_for_skin_condition_1"]) == {"NO_IMAGE_QUALITY_INSUFFICIENT"}
    for row in labels[~unlabelled].itertuples():
        names = ast.literal_eval(row.dermatologist_skin_condition_on_label_name)
        confidences = ast.literal_eval(row.dermatologist_skin_condition_confidence)
        weights = ast.literal_eval(row.weighted_skin_condition_label)
        assert len(names) == len(confidences) and all(1 <= c <= 5 for c in confidences)
        assert set(weights) == set(names) <= set(SYNTHETIC_CONDITION_COUNTS)
        assert abs(sum(weights.values()) - 1) < 0.03
        assert top_condition(row.weighted_skin_condition_label) == names[0]


def test_every_reference_has_a_file_except_planted_missing(generated):
    cases = _read_csv(generated.root / "dataset" / "scin_cases.csv")
    refs = _image_refs(cases)
    assert generated.n_image_refs == len(refs)
    plants = generated.plants.set_index("image_id")
    assert set(plants.index) == {image_id_from_path(p) for _, p in refs}
    for case_id, path in refs:
        image_id = image_id_from_path(path)
        exists = _image_path(generated.root, image_id).exists()
        assert exists == (plants.loc[image_id, "planted"] != "missing"), image_id
        assert plants.loc[image_id, "case_id"] == case_id


def test_every_defect_kind_is_planted_at_least_once_above_60_files(generated):
    assert len(generated.plants) >= 60
    counts = generated.plants["planted"].value_counts()
    for kind in DEFECT_KINDS:
        assert counts.get(kind, 0) >= 1, kind


def test_planted_files_really_have_their_defect(generated):
    root, plants = generated.root, generated.plants
    clean = [_load_rgb(_image_path(root, i)) for i in _ids_of(plants, "clean")[:40]]
    clean_lap = np.median([_laplacian_var(im) for im in clean])
    dark_red = []
    for i in _ids_of(plants, "dark"):
        im = _load_rgb(_image_path(root, i))
        assert _luminance(im).mean() < 45
        dark_red.append(_red_contrast(im))
        assert _red_contrast(im) < 5
    for i in _ids_of(plants, "dark_diagnostic"):
        im = _load_rgb(_image_path(root, i))
        assert _luminance(im).mean() <= DARK_DIAGNOSTIC_MAX_MEAN + 1
        assert _red_contrast(im) > 30 and _red_contrast(im) > 4 * max(dark_red)
    for i in _ids_of(plants, "blurred"):
        assert _laplacian_var(_load_rgb(_image_path(root, i))) < 0.2 * clean_lap
    for i in _ids_of(plants, "overexposed"):
        assert (_luminance(_load_rgb(_image_path(root, i))) >= 250).mean() > 0.5
    for im in clean:
        assert (_luminance(im) >= 250).mean() < 0.05  # clean images are not blown out
    for i in _ids_of(plants, "corrupt_truncated"):
        path = _image_path(root, i)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert cv2.imread(str(path)) is None
        with pytest.raises(OSError):
            Image.open(path).load()
    for i in _ids_of(plants, "corrupt_zero_byte"):
        assert _image_path(root, i).stat().st_size == 0
    for i in _ids_of(plants, "wrong_format"):
        path = _image_path(root, i)
        assert path.read_bytes()[:3] == b"\xff\xd8\xff"
        assert Image.open(path).format == "JPEG"
    for i in _ids_of(plants, "decompression_bomb"):
        data = _image_path(root, i).read_bytes()
        assert data[12:16] == b"IHDR" and struct.unpack(">II", data[16:24]) == (30000, 30000)
        assert len(data) < 10_000
        with pytest.raises(Image.DecompressionBombError):
            Image.open(_image_path(root, i))
    for i in _ids_of(plants, "missing"):
        assert not _image_path(root, i).exists()


def test_near_duplicate_copies_a_clean_image_of_another_case(generated):
    plants = generated.plants.set_index("image_id")
    dups = _ids_of(generated.plants, "near_duplicate")
    assert dups
    for i in dups:
        detail = plants.loc[i, "detail"]
        source = detail.split("source_image_id=")[1].split(";")[0]
        assert plants.loc[source, "planted"] == "clean"
        assert plants.loc[source, "case_id"] != plants.loc[i, "case_id"]
        assert f"source_case_id={plants.loc[source, 'case_id']}" in detail
        # Structure correlation at 32x24 grey: the copy matches its source far better than any other image.
        dup = _grey_signature(_image_path(generated.root, i))
        assert not np.array_equal(dup, _grey_signature(_image_path(generated.root, source)))  # altered copy
        to_source = float(dup @ _grey_signature(_image_path(generated.root, source)))
        to_others = [
            float(dup @ _grey_signature(_image_path(generated.root, o)))
            for o in _ids_of(generated.plants, "clean")[:60]
            if o != source
        ]
        assert to_source > 0.7 and to_source > max(to_others) + 0.1


def _grey_signature(path: Path) -> np.ndarray:
    grey = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (32, 24), interpolation=cv2.INTER_AREA)
    v = grey.astype(np.float64).ravel()
    v -= v.mean()
    return v / (np.linalg.norm(v) + 1e-9)


def test_image_colour_follows_monk_tone(generated):
    plants = generated.plants
    lum = {}
    for row in plants[plants["planted"] == "clean"].itertuples():
        image = _load_rgb(_image_path(generated.root, row.image_id))
        lum.setdefault(row.monk_tone, []).append(_luminance(image).mean())
    means = {tone: float(np.mean(v)) for tone, v in lum.items()}
    present = [t for t in (1, 6, 10) if t in means]
    assert len(present) >= 2
    assert all(means[a] > means[b] for a, b in zip(present, present[1:]))
    tones = sorted(means)
    assert np.corrcoef(tones, [means[t] for t in tones])[0, 1] < -0.8
    # Tone 10 is rare in the data (2 of 5,033): check the whole scale directly too.
    direct = [_luminance(render_skin_image(f"t{t}", t, NONSPECIFIC_PATTERN, SMALL, 0)).mean() for t in (1, 6, 10)]
    assert direct[0] > direct[1] > direct[2]


def _shape_and_colour_features(images: np.ndarray) -> np.ndarray:
    """Placement- and skin-tone-invariant features of 32x32 RGB images (float32, shape (n, 32, 32, 3)).

    How much of the image departs from its own median skin colour and in which direction (redder, lighter,
    darker, yellower), how sharp the red edges are, how ragged the red region is (boundary / sqrt(area)),
    and how much is dark red (scratch marks).
    """
    deviation = images - np.median(images.reshape(len(images), -1, 3), axis=1)[:, None, None, :]
    red = deviation[..., 0] - deviation[..., 1]
    light = deviation @ np.array([0.299, 0.587, 0.114], np.float32)
    yellow = deviation[..., 0] + deviation[..., 1] - 2 * deviation[..., 2]
    feats = [np.stack([(a > t).mean(axis=(1, 2)) for t in (3, 8, 15, 30)], 1) for a in (red, light, -light, yellow)]
    edges = [
        (np.abs(np.diff(red, axis=2)) > t).mean(axis=(1, 2)) + (np.abs(np.diff(red, axis=1)) > t).mean(axis=(1, 2))
        for t in (3, 8, 15)
    ]
    feats.append(np.stack(edges, 1))
    for t in (6, 12):
        m = red > t
        inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
        boundary = m[:, 1:-1, 1:-1].sum(axis=(1, 2)) - inner.sum(axis=(1, 2))
        feats.append((boundary / np.sqrt(m.sum(axis=(1, 2)) + 1))[:, None])
    feats.append(((red > 10) & (light < -10)).mean(axis=(1, 2))[:, None])
    return np.concatenate(feats, 1)


def _fit_softmax_regression(x: np.ndarray, y: np.ndarray, n_classes: int, steps: int = 1500) -> np.ndarray:
    """Multinomial logistic regression by plain gradient descent (weights incl. a bias row)."""
    a = np.c_[x, np.ones(len(x))]
    onehot = np.eye(n_classes)[y]
    w = np.zeros((a.shape[1], n_classes))
    for _ in range(steps):
        logits = a @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * (a.T @ (p - onehot) / len(a) + 1e-3 * w)
    return w


def test_conditions_give_learnably_different_images(tmp_path):
    """A tiny logistic regression on 32x32 images tells the 3 commonest conditions apart on held-out cases."""
    mirror = write_synthetic_mirror(tmp_path, n_cases=360, seed=11, image_size=(128, 96), defect_rate=0)
    classes = ["Eczema", "Allergic Contact Dermatitis", "Urticaria"]
    plants = mirror.plants[mirror.plants["condition"].isin(classes) & (mirror.plants["planted"] == "clean")]
    images = np.stack(
        [
            cv2.resize(_load_rgb(_image_path(tmp_path, i)), (32, 32), interpolation=cv2.INTER_AREA)
            for i in plants["image_id"]
        ]
    ).astype(np.float32)
    labels = plants["condition"].map(classes.index).to_numpy()
    x = _shape_and_colour_features(images)

    # Split by case: images of one case share tone and pattern, so they must not straddle the split.
    held_out = plants["case_id"].map(lambda c: int(hashlib.sha256(c.encode()).hexdigest(), 16) % 3 == 0).to_numpy()
    train, test = ~held_out, held_out
    assert all((labels[train] == k).sum() >= 8 and (labels[test] == k).sum() >= 4 for k in range(3))
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = (x - mu) / sd
    w = _fit_softmax_regression(z[train], labels[train], 3)
    predicted = np.argmax(np.c_[z[test], np.ones(test.sum())] @ w, axis=1)
    accuracy = (predicted == labels[test]).mean()
    assert accuracy > 0.75, f"held-out accuracy {accuracy:.2f} (chance 0.33)"


def test_generated_mirror_is_deterministic_per_seed(generated, tmp_path):
    again = write_synthetic_mirror(tmp_path / "again", n_cases=120, seed=7, image_size=SMALL)
    assert _tree_digest(again.root) == _tree_digest(generated.root)
    other = write_synthetic_mirror(tmp_path / "other", n_cases=120, seed=8, image_size=SMALL)
    assert set(other.plants["case_id"]).isdisjoint(set(generated.plants["case_id"]))


def test_defect_rate_zero_plants_nothing(tmp_path):
    mirror = write_synthetic_mirror(tmp_path, n_cases=40, seed=1, image_size=(48, 36), defect_rate=0)
    assert set(mirror.plants["planted"]) == {"clean"}
    assert mirror.n_files_written == mirror.n_image_refs


def test_workers_do_not_change_the_output(tmp_path):
    one = write_synthetic_mirror(tmp_path / "one", n_cases=40, seed=2, image_size=(48, 36), defect_rate=0.5)
    two = write_synthetic_mirror(tmp_path / "two", n_cases=40, seed=2, image_size=(48, 36), defect_rate=0.5, workers=2)
    assert _tree_digest(one.root) == _tree_digest(two.root)


# ------------------------------------------------------------------------------------------------ out_root safety


def test_refuses_a_non_empty_out_root_and_overwrite_removes_only_its_own_files(tmp_path):
    write_synthetic_mirror(tmp_path, n_cases=10, seed=1, image_size=(48, 36))
    with pytest.raises(ValueError, match="not empty"):
        write_synthetic_mirror(tmp_path, n_cases=10, seed=1, image_size=(48, 36))
    stale = _image_path(tmp_path, "123")
    stale.write_bytes(b"old")
    notes = tmp_path / "dataset" / "images" / "notes.txt"
    notes.write_text("mine")
    mirror = write_synthetic_mirror(tmp_path, n_cases=12, seed=2, image_size=(48, 36), overwrite=True)
    assert not stale.exists()
    assert notes.read_text() == "mine"
    assert len(list((tmp_path / "dataset" / "images").glob("*.png"))) == mirror.n_files_written
    assert len(_read_csv(tmp_path / "dataset" / "scin_cases.csv")) == 12


def test_overwrite_refuses_a_folder_that_is_not_a_synthetic_mirror(tmp_path):
    real_looking = _image_path(tmp_path, "42")
    real_looking.parent.mkdir(parents=True)
    real_looking.write_bytes(b"maybe a real photograph")
    with pytest.raises(ValueError, match=MARKER_FILE):
        write_synthetic_mirror(tmp_path, n_cases=5, image_size=(48, 36), overwrite=True)
    assert real_looking.read_bytes() == b"maybe a real photograph"


def test_metadata_dir_without_the_csvs_is_refused(tmp_path):
    (tmp_path / "meta").mkdir()
    with pytest.raises(ValueError, match="scin_cases.csv"):
        write_synthetic_mirror(tmp_path / "out", metadata_dir=tmp_path / "meta")
    (tmp_path / "meta" / "scin_cases.csv").write_text("case_id,image_1_path,image_2_path,image_3_path\n")
    with pytest.raises(ValueError, match="scin_labels.csv"):
        write_synthetic_mirror(tmp_path / "out", metadata_dir=tmp_path / "meta")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ real metadata


def _raw_rows_by_case(csv_path: Path) -> tuple[str, dict[str, str]]:
    """Header line and {case_id: raw line}: the release has no quoted newlines, so a line is a row."""
    lines = csv_path.read_text(encoding="utf-8").split("\n")
    return lines[0], {line.split(",", 1)[0]: line for line in lines[1:] if line}


def test_real_subset_rows_are_copied_verbatim(real_mirror, real_metadata_dir):
    for name in ("scin_cases.csv", "scin_labels.csv"):
        real_header, real_rows = _raw_rows_by_case(real_metadata_dir / name)
        out_lines = (real_mirror.root / "dataset" / name).read_text(encoding="utf-8").split("\n")
        assert out_lines[0] == real_header
        assert out_lines[-1] == ""  # newline-terminated, like the release
        body = out_lines[1:-1]
        assert len(body) == 120
        assert all(line == real_rows[line.split(",", 1)[0]] for line in body)
        ids = [line.split(",", 1)[0] for line in body]
        assert ids == [c for c in real_rows if c in set(ids)]  # release order kept
    cases = _read_csv(real_mirror.root / "dataset" / "scin_cases.csv")
    assert set(real_mirror.plants["case_id"]) <= set(cases["case_id"])
    assert set(cases["release"]) == {"1.0.0"}
    real_cases = _read_csv(real_metadata_dir / "scin_cases.csv")
    assert set(cases["case_id"]) <= set(real_cases["case_id"])  # exact strings, no float mangling


def test_real_mirror_images_match_the_references(real_mirror):
    cases = _read_csv(real_mirror.root / "dataset" / "scin_cases.csv")
    refs = _image_refs(cases)
    assert real_mirror.n_image_refs == len(refs)
    plants = real_mirror.plants.set_index("image_id")
    for _, path in refs:
        image_id = image_id_from_path(path)
        assert _image_path(real_mirror.root, image_id).exists() == (plants.loc[image_id, "planted"] != "missing")
    for kind in DEFECT_KINDS:
        assert (real_mirror.plants["planted"] == kind).any(), kind


def test_real_mirror_is_deterministic(real_mirror, real_metadata_dir, tmp_path):
    again = write_synthetic_mirror(
        tmp_path / "a", metadata_dir=real_metadata_dir, n_cases=120, seed=3, image_size=SMALL
    )
    assert _tree_digest(again.root) == _tree_digest(real_mirror.root)
    other = write_synthetic_mirror(
        tmp_path / "b", metadata_dir=real_metadata_dir, n_cases=120, seed=4, image_size=SMALL
    )
    assert set(other.plants["case_id"]) != set(real_mirror.plants["case_id"])


def _write_metadata(folder: Path, cases: pd.DataFrame, labels: pd.DataFrame) -> Path:
    folder.mkdir(parents=True)
    cases.to_csv(folder / "scin_cases.csv", index=False, lineterminator="\n")
    labels.to_csv(folder / "scin_labels.csv", index=False, lineterminator="\n")
    return folder


def test_real_shared_files_are_exact_reuse_and_the_known_missing_file_stays_missing(real_metadata_dir, tmp_path):
    cases = _read_csv(real_metadata_dir / "scin_cases.csv")
    labels = _read_csv(real_metadata_dir / "scin_labels.csv")
    refs = pd.DataFrame(_image_refs(cases), columns=["case_id", "path"])
    counts = refs["path"].value_counts()
    shared = set(counts[counts > 1].index)
    keep = set(refs.loc[refs["path"].isin(shared | {KNOWN_MISSING}), "case_id"])
    keep |= set(select_case_ids(cases["case_id"].tolist(), 40, seed=0))
    meta = _write_metadata(tmp_path / "meta", cases[cases["case_id"].isin(keep)], labels[labels["case_id"].isin(keep)])
    mirror = write_synthetic_mirror(tmp_path / "out", metadata_dir=meta, seed=5, image_size=(48, 36))

    plants = mirror.plants.set_index("image_id")
    reuse = plants[plants["planted"] == "exact_reuse"]
    assert len(shared) == 15
    assert set(reuse.index) == {image_id_from_path(p) for p in shared}
    sub_refs = refs[refs["case_id"].isin(keep)]
    assert sub_refs["path"].isin(shared).sum() == 42
    for image_id, row in reuse.iterrows():
        sharing_cases = set(sub_refs.loc[sub_refs["path"] == f"dataset/images/{image_id}.png", "case_id"])
        assert {row["case_id"], *row["detail"].split("case_id ")[1].split(";")} == sharing_cases
        assert _image_path(mirror.root, image_id).stat().st_size > 0
        assert _load_rgb(_image_path(mirror.root, image_id)).shape == (36, 48, 3)
    assert not plants.index.duplicated().any()  # a shared file is written and listed once
    missing_id = image_id_from_path(KNOWN_MISSING)
    assert plants.loc[missing_id, "planted"] == "missing"
    assert "real release" in plants.loc[missing_id, "detail"]
    assert not _image_path(mirror.root, missing_id).exists()
    # Seeded defects avoid shared files, and every kind is still planted (> 60 files).
    assert len(plants) >= 60
    for kind in DEFECT_KINDS:
        assert (plants["planted"] == kind).any(), kind


def test_bad_image_paths_are_rejected_and_never_written(real_metadata_dir, tmp_path):
    cases = _read_csv(real_metadata_dir / "scin_cases.csv")
    labels = _read_csv(real_metadata_dir / "scin_labels.csv")
    keep = set(select_case_ids(cases["case_id"].tolist(), 12, seed=0))
    cases, labels = cases[cases["case_id"].isin(keep)].copy(), labels[labels["case_id"].isin(keep)]
    bad = ["dataset/images/../../escaped.png", str(tmp_path / "absolute.png"), "dataset/images/0001.png"]
    cases.iloc[0, cases.columns.get_loc("image_2_path")] = bad[0]
    cases.iloc[1, cases.columns.get_loc("image_2_path")] = bad[1]
    cases.iloc[2, cases.columns.get_loc("image_3_path")] = bad[2]
    meta = _write_metadata(tmp_path / "meta", cases, labels)
    mirror = write_synthetic_mirror(tmp_path / "out", metadata_dir=meta, seed=1, image_size=(48, 36))

    rejected = mirror.plants[mirror.plants["planted"] == "rejected_path"]
    assert sorted(rejected["image_path"]) == sorted(bad)
    assert (rejected["image_id"] == "").all() and (rejected["detail"] != "").all()
    assert not (tmp_path / "escaped.png").exists()
    assert not (tmp_path / "absolute.png").exists()
    written = {p.name for p in (tmp_path / "out" / "dataset" / "images").iterdir()}
    assert "0001.png" not in written
    assert mirror.n_image_refs == len(_image_refs(cases))
    # The bad references stay in the CSV verbatim: the mirror mirrors; later stages reject them.
    out_cases = _read_csv(tmp_path / "out" / "dataset" / "scin_cases.csv")
    assert set(bad) <= set(out_cases[["image_2_path", "image_3_path"]].to_numpy().ravel())
