"""``scin-pipeline predict``: classify image files and folders with a registered model, one CSV row per image.

The model is loaded as the web service loads it (:mod:`.model`: the version behind ``models:/NAME@ALIAS``,
unwrapped to its packaged classifier), and every image goes through the service's own steps
(:mod:`.prediction`): the guarded decoder (header checks and the pixel cap before any pixel buffer exists),
the quality verdict on the full-size pixels, training's preprocessing, then the package's calibrated
``predict_proba``, many images per call. The questionnaire: by default every case is unanswered (the page
with an empty form); ``--answers CSV`` gives answers per image (:func:`read_answers`: a ``path`` column as
the output CSV writes it, then the form's fields, checked as the form checks them). Only a model that reads
the questionnaire (``keras_multimodal``) uses them; the ``questionnaire`` column of each row says which.

- Paths: a file named on the command line is tried whatever its suffix (the decoder judges the bytes); a
  folder is searched recursively for files with an image suffix (``IMAGE_SUFFIXES``, any case). Paths keep
  the form the user gave (a folder ``photos`` yields ``photos/a/1.png``), sorted, each file once.
- A file that cannot be classified (unreadable, not PNG/JPEG, corrupt, truncated, over the pixel cap or the
  byte cap, a side under 16 px) gets a row with ``status`` ``error``, an error code and the decoder's
  message, which names the file; the others are classified. Decoding runs in a few threads (OpenCV and the
  quality metrics release the GIL); the model call is one per batch.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scin_pipeline.serve.batching import stack_cases
from scin_pipeline.serve.inputs import METADATA_FIELDS, PredictionRequest, RequestError, validated_metadata
from scin_pipeline.serve.limits import DEFAULT_MAX_PIXELS
from scin_pipeline.serve.model import ServedModel
from scin_pipeline.serve.prediction import TOP_K, calibration_info, decode_photo, prepare_inputs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_FILE_BYTES = 64 * 2**20
NO_QUESTIONNAIRE = PredictionRequest(image=None)
ANSWERS_PATH_COLUMN = "path"


class PathsError(ValueError):
    """A path on the command line that cannot be used (missing, or a folder without any image)."""


def find_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files named by ``paths`` (module docstring); PathsError naming the first bad path."""
    found: dict[Path, Path] = {}
    for given in paths:
        path = Path(given)
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise PathsError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below")
            for file in inside:
                found.setdefault(file.resolve(), file)
        elif path.is_file():
            found.setdefault(path.resolve(), path)
        elif path.exists():
            raise PathsError(f"{path}: not a regular file or a folder")
        else:
            raise PathsError(f"{path}: no such file or folder")
    return sorted(found.values(), key=str)


def read_answers(csv_path: str | os.PathLike, files: Sequence[Path]) -> dict[Path, PredictionRequest]:
    """Questionnaire answers per image from a CSV: a ``path`` column naming one of ``files`` (as given, or
    any path to the same file, relative to the working directory) and any of the form's fields
    (``METADATA_FIELDS``; a check-box group as comma-separated values, an empty cell = not answered).
    PathsError naming the file, row and column for an unknown column, a value the form would refuse, a path
    that is not among ``files``, or a path given twice: answers are never silently dropped."""
    source = Path(csv_path)
    by_file = {file.resolve(): file for file in files}
    try:
        with open(source, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = list(reader.fieldnames or [])
            if ANSWERS_PATH_COLUMN not in columns:
                raise PathsError(
                    f"{source}: no `{ANSWERS_PATH_COLUMN}` column (the columns are `{ANSWERS_PATH_COLUMN}` and "
                    f"any of {list(METADATA_FIELDS)})"
                )
            unknown = [c for c in columns if c != ANSWERS_PATH_COLUMN and c not in METADATA_FIELDS]
            if unknown:
                raise PathsError(
                    f"{source}: unknown column(s) {unknown}; the questionnaire's are {list(METADATA_FIELDS)}"
                )
            answers: dict[Path, PredictionRequest] = {}
            for line, record in enumerate(reader, start=2):  # line 1 is the header
                where = f"{source} line {line}"
                given = (record.get(ANSWERS_PATH_COLUMN) or "").strip()
                if not given:
                    raise PathsError(f"{where}: empty `{ANSWERS_PATH_COLUMN}`")
                file = by_file.get(Path(given).resolve())
                if file is None:
                    raise PathsError(f"{where}: {given!r} is not among the images to classify")
                if file in answers:
                    raise PathsError(f"{where}: {given!r} has answers on an earlier line too")
                fields = {name: [value] for name, value in record.items() if name in METADATA_FIELDS and value}
                try:
                    answers[file] = PredictionRequest(image=None, metadata=validated_metadata(fields))
                except RequestError as exc:
                    raise PathsError(f"{where}: {exc.detail}") from exc
    except OSError as exc:
        raise PathsError(f"{source}: {exc.strerror or exc}") from exc
    except (csv.Error, UnicodeDecodeError) as exc:
        raise PathsError(f"{source}: not a readable UTF-8 CSV ({exc})") from exc
    return answers


@dataclass
class PreparedImage:
    """One file after decoding (or its refusal): what the CSV row and the model call need."""

    path: Path
    quality: dict | None = None
    images: np.ndarray | None = None  # (1, S, S, 3) uint8 when the model uses images
    cases: pd.DataFrame | None = None
    questionnaire: str = ""  # answered | blank | not used (the model does not read it)
    error: str = ""
    error_detail: str = ""


def prepare_file(
    served: ServedModel,
    path: Path,
    *,
    max_pixels: int,
    max_file_bytes: int,
    request: PredictionRequest = NO_QUESTIONNAIRE,
) -> PreparedImage:
    """Read, decode (guarded), check quality and preprocess one file as the service does, with the
    questionnaire of ``request``; an error row instead of an exception for a file that cannot be used."""
    try:
        size = path.stat().st_size
        if size > max_file_bytes:
            return PreparedImage(
                path, error="too_large", error_detail=f"{path}: {size:,} bytes, over the limit of {max_file_bytes:,}"
            )
        data = path.read_bytes()
    except OSError as exc:
        return PreparedImage(path, error="unreadable", error_detail=f"{path}: {exc.strerror or exc}")
    try:
        rgb = decode_photo(data, str(path), max_pixels)
    except RequestError as exc:
        return PreparedImage(path, error=exc.error, error_detail=exc.detail)
    quality, images, cases = prepare_inputs(served, request, rgb)
    questionnaire = "not used" if not served.uses_metadata else "answered" if request.metadata else "blank"
    return PreparedImage(path, quality=quality, images=images, cases=cases, questionnaire=questionnaire)


def output_columns(classes: Sequence[str]) -> list[str]:
    top = [f"top{i}{suffix}" for i in range(1, TOP_K + 1) for suffix in ("", "_probability")]
    return [
        "path",
        "status",
        "error",
        "error_detail",
        "quality_verdict",
        "quality_issues",
        "width",
        "height",
        "questionnaire",
        *top,
        *(f"probability_{c}" for c in classes),
        "calibrated",
        "temperature",
        "model_uri",
        "model_version",
        "notice",
    ]


def _row(served: ServedModel, prepared: PreparedImage, probabilities: np.ndarray | None) -> dict:
    calibration = calibration_info(served)
    row: dict[str, object] = {
        "path": str(prepared.path),
        "status": "error" if prepared.error else "ok",
        "error": prepared.error,
        "error_detail": prepared.error_detail,
        "questionnaire": prepared.questionnaire,
        "calibrated": calibration["calibrated"],
        "temperature": calibration["temperature"],
        "model_uri": served.loaded_uri,
        "model_version": served.version,
        "notice": "NOT A DIAGNOSIS" + ("; model trained on SYNTHETIC images" if served.synthetic_data else ""),
    }
    if prepared.quality is not None:
        row.update(
            quality_verdict=prepared.quality["verdict"],
            quality_issues=";".join(issue["issue"] for issue in prepared.quality["issues"]),
            width=prepared.quality["width"],
            height=prepared.quality["height"],
        )
    if probabilities is not None:
        order = np.argsort(-probabilities, kind="stable")[:TOP_K]  # the service's ranking (prediction.answer)
        for rank, index in enumerate(order, start=1):
            row[f"top{rank}"] = served.classes[index]
            row[f"top{rank}_probability"] = float(probabilities[index])
        row.update({f"probability_{c}": float(p) for c, p in zip(served.classes, probabilities)})
    return row


def check_image_model(served: ServedModel) -> None:
    """ValueError unless ``served`` predicts from images (a metadata-only model would answer the same for
    every photo)."""
    if not served.uses_image:
        raise ValueError(
            f"{served.loaded_uri} is a {served.kind} model: it answers from the questionnaire only, not from "
            "images; pass --model with an image model"
        )


def classify_files(
    served: ServedModel,
    files: Sequence[Path],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    on_batch: Callable[[int], object] | None = None,
    answers: Mapping[Path, PredictionRequest] | None = None,
) -> Iterator[dict]:
    """One row per file (columns :func:`output_columns`), in ``files`` order, ``batch_size`` files per
    model call; ``on_batch(n)`` after each batch of ``n`` files; ``answers``: a file's questionnaire
    (:func:`read_answers`; a file without one is unanswered)."""
    answers = answers or {}
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}")
    check_image_model(served)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scin-predict-decode") as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            prepared = list(
                pool.map(
                    lambda path: prepare_file(
                        served,
                        path,
                        max_pixels=max_pixels,
                        max_file_bytes=max_file_bytes,
                        request=answers.get(path, NO_QUESTIONNAIRE),
                    ),
                    chunk,
                )
            )
            usable = [p for p in prepared if not p.error]
            probabilities = iter(())
            if usable:
                images = np.concatenate([p.images for p in usable if p.images is not None])
                cases = stack_cases([p.cases for p in usable if p.cases is not None])
                probabilities = iter(served.predict_proba(images, cases))
            for item in prepared:
                yield _row(served, item, None if item.error else next(probabilities))
            if on_batch is not None:
                on_batch(len(chunk))
